"""Verifiable rewards for PPO tests (imported by name from configs: `ppo_rewards:vowel_share`)."""


def vowel_share(prompts, responses):
    return [sum(c in "aeiou" for c in r) / max(1, len(r)) for r in responses]


def has_letter_e(prompts, responses):
    """Pass/fail: whether the response has an 'e' (whole groups often pass or fail together)."""
    return [float("e" in r) for r in responses]


def wrong_length(prompts, responses):
    return [0.0]


def not_numbers(prompts, responses):
    return ["high"] * len(responses)
