"""Alpaca-style prompts, worded exactly as the RLKD official code (sft/sft_dataset.py) words them.

The response is appended directly after "### Response:" with no separator, as the official code
concatenates source and target strings.
"""

from __future__ import annotations

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

# Our choice: the paper does not publish its XSum prompt, and its code has no XSum loader.
XSUM_INSTRUCTION = "Summarize the following article in one sentence."


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def split_gsm8k_query(query: str) -> tuple[str, str]:
    """Official code: the first line of the query is the instruction, the rest is the input."""
    first, _, rest = query.partition("\n")
    return first, rest
