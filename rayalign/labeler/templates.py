"""Labeling prompts (Lee et al. 2023, RLAIF): preamble, optional few-shot exemplars,
the sample, and an ending whose next token is scored.

Each template is plain data (a pydantic section), so a config can replace any part;
``PRESETS`` holds the shipped ones. A template's ``version`` is recorded with every
label it produces.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ..config import Section


class Exemplar(Section):
    context: str
    response_1: str
    response_2: str
    preferred: Literal[1, 2]
    rationale: Optional[str] = None


class LabelTemplate(Section):
    name: str = "custom"
    version: str = "1"
    preamble: str
    exemplars: list[Exemplar] = Field(default_factory=list)
    sample: str = "Context: {context}\nResponse 1: {response_1}\nResponse 2: {response_2}"
    ending: str = "Which response is better? Answer 1 or 2.\nPreferred Response="
    options: tuple[str, str] = Field(("1", "2"), description="pairwise: the answers naming the first and the "
                                     "second response, whose log-probs give P(first preferred)")
    cot_request: str = (
        "Explain step by step which response is better, considering the criteria above. "
        "Do not answer with a number yet.\nRationale:"
    )
    cot_ending: str = "So, which response is better? Answer 1 or 2.\nPreferred Response="
    # Pointwise: the sample, then one Yes/No question about it (several with criteria). The
    # question comes after the sample so that a backend can encode the sample once and ask
    # every criterion's question after it.
    pointwise_sample: str = "Question: {context}\nResponse: {response}"
    pointwise_question: str = Field(
        "Is this response helpful, honest and harmless? Answer Yes or No.",
        description="the overall question; also the question of few-shot exemplars")
    criteria: dict[str, str] = Field(
        default_factory=lambda: dict(CRITERIA),
        description="per-criterion questions, asked when labeler.criteria names them")
    pointwise_good: Literal["Yes", "No"] = Field(
        "Yes", description="the answer that marks an acceptable response")
    pointwise_preamble: str = ""
    relevance_neutral_prompt: str = Field(
        "Say something.", description="the question-free request that pointwise relevance compares against")
    score: str = (
        "Question: {context}\nResponse: {response}\n\n"
        "Rate the response from 1 (very bad) to 10 (excellent) for being helpful, honest and "
        "harmless. Answer with a single number.\nScore:"
    )
    # Harmlessness judged on the request alone (`Labeler.should_refuse`). Asked which of two
    # responses is more harmless, a judge follows the prompt's instruction rather than the
    # content (told that refusing harmful requests is good, the 1.5B preferred refusals of
    # benign questions too). Asked whether a request should be refused, the 1.5B did worse
    # than chance on dev requests (AUC 0.16-0.33 over three wordings: it answers Yes to
    # "What is the capital of France?"), yet sent the request itself it declines the
    # harmful ones: its own reply is the signal ("self"), the chance that it opens with one
    # of `refusal_openers` (AUC 0.94 on the same requests; benchmarks/harmlessness.py).
    refusal_openers: list[str] = Field(
        default_factory=lambda: ["I", "Sorry"],
        description="refusal_signal=self: first tokens with which the judge's own reply to a request "
        "declines it (\"I'm sorry\", \"I can't\", \"Sorry, ...\"); their probability is P(it would refuse)")
    refusal_request: str = Field(
        "A user sent this message to an AI assistant:\n\n{context}\n\n"
        "Should a responsible AI assistant refuse to answer it because answering could help "
        "someone cause harm (violence, crime, abuse, self-harm, hate, or exposing a private "
        "person's information)? Ordinary, personal, silly or unusual questions should be "
        "answered. Answer Yes or No.",
        description="the request-level question whose P(Yes) is P(should refuse); {context} is the request")
    # SteerLM: one 0-4 rating per attribute, the expected value over "0".."4".
    attribute: str = (
        "Question: {context}\nResponse: {response}\n\n"
        "Rate the response's {attribute} ({meaning}) from 0 to 4. Answer with a single number.\nRating:"
    )
    attributes: dict[str, str] = Field(
        default_factory=lambda: dict(ATTRIBUTES),
        description="what each SteerLM attribute means, as the rating prompt explains it")

    # ------------------------------------------------------------ rendering

    def pairwise_text(self, context: str, r1: str, r2: str, rationale: str | None = None,
                      cot_step: bool = False) -> str:
        parts = [self.preamble.strip()] if self.preamble.strip() else []
        for ex in self.exemplars:
            shot = self.sample.format(context=ex.context, response_1=ex.response_1, response_2=ex.response_2)
            if ex.rationale:
                shot += f"\nRationale: {ex.rationale}"
            parts.append(f"{shot}\n{self.ending.strip()}{self.options[ex.preferred - 1]}")
        sample = self.sample.format(context=context, response_1=r1, response_2=r2)
        if cot_step:
            parts.append(f"{sample}\n{self.cot_request}")
        elif rationale is not None:
            parts.append(f"{sample}\nRationale: {rationale.strip()}\n{self.cot_ending}")
        else:
            parts.append(f"{sample}\n{self.ending}")
        return "\n\n".join(parts)

    def pointwise_sample_text(self, context: str, response: str) -> str:
        body = self.pointwise_sample.format(context=context, response=response)
        return f"{self.pointwise_preamble.strip()}\n\n{body}".strip()

    def pointwise_text(self, context: str, response: str) -> str:
        """The single-question prompt (sample, blank line, question)."""
        return f"{self.pointwise_sample_text(context, response)}\n\n{self.pointwise_question}"

    def refusal_text(self, context: str) -> str:
        return self.refusal_request.format(context=context)

    def score_text(self, context: str, response: str) -> str:
        return self.score.format(context=context, response=response)

    def attribute_text(self, context: str, response: str, attribute: str) -> str:
        if attribute not in self.attributes:
            raise ValueError(f"template {self.name!r} has no attribute {attribute!r} "
                             f"(it has {', '.join(self.attributes)})")
        return self.attribute.format(context=context, response=response, attribute=attribute,
                                     meaning=self.attributes[attribute])


# SteerLM's attributes (HelpSteer, Wang et al. 2023), each rated 0-4.
ATTRIBUTES = {
    "helpfulness": "how well it answers what was asked; 0 not at all, 4 fully",
    "correctness": "how true and accurate its content is; 0 wrong, 4 entirely correct",
    "coherence": "how clear and consistent it is; 0 incoherent, 4 perfectly clear",
    "complexity": "how much expertise it takes to write; 0 anyone could, 4 only an expert",
    "verbosity": "how much detail it gives for what was asked; 0 terse, 4 very detailed",
}

# The HHH criteria (Askell et al. 2021) asked one at a time.
CRITERIA = {
    "helpful": "Is this response helpful? Answer Yes or No.",
    "honest": "Is this response true and honest? Answer Yes or No.",
    "harmless": "Is this response harmless and ethical? Answer Yes or No.",
    "correct": "Is this response correct? Answer Yes or No.",
    "good": "Is this a good response to the question? Answer Yes or No.",
}

_HELPFUL = (
    "A good response to a user is helpful (it answers what was asked, correctly and on "
    "topic), honest, and harmless (it declines requests that could cause harm)."
)

PRESETS: dict[str, LabelTemplate] = {
    "helpfulness": LabelTemplate(
        name="helpfulness", version="2",
        preamble="You are an expert rater of AI assistant responses. " + _HELPFUL +
                 " Given a context and two responses, choose the more helpful one.",
    ),
    # The plain chat question of the judge issue's 86% (Qwen2.5-Coder-1.5B, 80 mc-pairs-dev
    # pairs, both orders): no rater preamble, lettered answers, "Reply A or B".
    "helpfulness-ab": LabelTemplate(
        name="helpfulness-ab", version="1", preamble="",
        sample="Question: {context}\n\nAnswer A: {response_1}\n\nAnswer B: {response_2}",
        ending="Which answer is more helpful, correct and harmless? Reply A or B.",
        cot_ending="So, which answer is more helpful, correct and harmless? Reply A or B.",
        options=("A", "B"),
    ),
    "harmlessness": LabelTemplate(
        name="harmlessness", version="2",
        preamble="You are an expert rater of AI assistant responses. Choose the response that is "
                 "less harmful: one that refuses to help with dangerous, illegal or hateful requests "
                 "and stays respectful is better than one that complies.",
        pointwise_question="Is this response harmful, dangerous or disrespectful? Answer Yes or No.",
        pointwise_good="No",
    ),
    "summarization": LabelTemplate(
        name="summarization", version="2",
        preamble="A good summary is a shorter piece of text that has the essence of the original. It "
                 "captures the most important points, is coherent, accurate and fluent. Given a text "
                 "and two summaries, choose the better summary.",
        sample="Text: {context}\nSummary 1: {response_1}\nSummary 2: {response_2}",
        ending="Which summary is better? Answer 1 or 2.\nPreferred Summary=",
        cot_ending="So, which summary is better? Answer 1 or 2.\nPreferred Summary=",
        pointwise_sample="Text: {context}\nSummary: {response}",
        pointwise_question="Is this a good, accurate summary of the text? Answer Yes or No.",
        criteria={"accurate": "Is this summary accurate? Answer Yes or No.",
                  "coherent": "Is this summary coherent and fluent? Answer Yes or No."},
        score="Text: {context}\nSummary: {response}\n\nRate the summary from 1 (very bad) to 10 "
              "(excellent). Answer with a single number.\nScore:",
    ),
}


def resolve_template(name: str, overrides: dict | None = None) -> LabelTemplate:
    from ..errors import RayalignError

    if name not in PRESETS:
        raise RayalignError(f"unknown labeler template {name!r}; presets: {', '.join(PRESETS)}")
    data = PRESETS[name].model_dump()
    data.update(overrides or {})
    if overrides:
        data["name"] = f"{name}+custom"
    return LabelTemplate.model_validate(data)
