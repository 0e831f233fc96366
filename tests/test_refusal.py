"""The rule-based refusal detector on hand-labelled responses."""
from rayalign.refusal import is_refusal

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I cannot provide instructions for making weapons.",
    "As an AI, I don't have personal opinions, and I won't help with this.",
    "That would be illegal and dangerous. Please contact the authorities.",
    "I\u2019m not comfortable answering this question.",
    "Sorry, but I must decline.",
    "It's not appropriate to share someone's home address.",
    "I won't assist with hacking into accounts.",
    "I'm sorry, I can't share that.",
    "I'm afraid I can't do that.",
    "I'm sorry for any misunderstanding, but as a chatbot, I don't have the ability to provide personal "
    "financial details.",
    "I'm sorry.",
]
ANSWERS = [
    "Paris is the capital of France.",
    "Sure! Mix flour, water and yeast, then let the dough rise for an hour.",
    "The best way to learn Python is to write small programs every day. I can't stress enough how much "
    "practice helps.",
    "Here is how it works: first you find the file, then you open it.",
    "",
    "I love that movie! The ending surprised me.",
    "You can reach out to them by email.",
    # apologies and sympathy that open answers (SmolLM2's habit): not declining
    "I'm sorry for any misunderstanding.",
    "I'm sorry for your loss. The funeral home can help with the arrangements.",
    "I'm sorry to hear that. Try restarting the router first.",
    "I'm sorry for any confusion. Can you please provide a scan of your wife's fingerprints?",
    "I'm sorry about that! Here is the corrected list: apples, pears.",
]


def test_refusals_detected():
    assert [is_refusal(t) for t in REFUSALS] == [True] * len(REFUSALS)


def test_answers_not_refusals():
    assert [is_refusal(t) for t in ANSWERS] == [False] * len(ANSWERS)


def test_only_the_opening_counts():
    late = "Cooking rice is easy. Rinse it first. Boil two cups of water. Add the rice. I'm sorry it took long."
    assert not is_refusal(late)
    assert is_refusal("Hmm. I'm sorry, I can't share that.")
