"""Ways to pick a ``select`` choice from the model's logprobs of each continuation (SGLang's
three methods, same names and decision rules)."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any

# A logprob entry as the native API returns it: [logprob or None, token_id, text or None].
LogprobEntry = list


@dataclasses.dataclass
class ChoicesDecision:
    """The chosen string and the scores that led to it."""

    decision: str
    meta_info: dict[str, Any] | None = None


class ChoicesSamplingMethod(ABC):
    """Decides between choices given per-choice prompt logprobs."""

    @property
    def requires_unconditional_logprobs(self) -> bool:
        """Whether the backend must also score each choice's tokens with no prefix."""
        return False

    @abstractmethod
    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: list[list[LogprobEntry]],
        output_token_logprobs: list[list[LogprobEntry]],
        unconditional_token_logprobs: list[list[LogprobEntry]] | None = None,
    ) -> ChoicesDecision: ...


_TIE = 1e-5


def _argmax(values: list[float]) -> int:
    # First maximum wins, like numpy.argmax, so ties resolve to the earlier choice.
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _base_meta(normalized, inputs, outputs) -> dict[str, Any]:
    return {
        "normalized_prompt_logprobs": normalized,
        "input_token_logprobs": inputs,
        "output_token_logprobs": outputs,
    }


class TokenLengthNormalized(ChoicesSamplingMethod):
    """The choice with the highest mean logprob over its tokens."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs,
                 output_token_logprobs, unconditional_token_logprobs=None):  # fmt: skip
        best = choices[_argmax(normalized_prompt_logprobs)]
        meta = _base_meta(normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs)
        return ChoicesDecision(best, meta)


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Compare choices token by token, keeping those with the best logprob at each position; a
    shorter choice is padded with its own mean logprob so prefixes of longer choices compete."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs,
                 output_token_logprobs, unconditional_token_logprobs=None):  # fmt: skip
        width = max(len(opt) for opt in input_token_logprobs)
        matrix = []
        for opt in input_token_logprobs:
            row = [float(t[0] or 0.0) for t in opt]
            mean = sum(row) / len(row) if row else 0.0
            matrix.append(row + [mean] * (width - len(row)))
        remaining = list(range(len(choices)))
        for j in range(width):
            best = max(matrix[i][j] for i in remaining)
            # Within float noise counts as a tie: the same token scored in two rows of one
            # batch can differ in the 7th digit, which must not decide (SGLang compares ==).
            remaining = [i for i in remaining if matrix[i][j] >= best - _TIE]
            if len(remaining) == 1:
                break
        meta = _base_meta(normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs)
        meta["greedy_logprob_matrix"] = matrix
        return ChoicesDecision(choices[remaining[0]], meta)


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """The choice whose tokens gain the most logprob from the prefix: mean of
    (conditional - unconditional) token logprobs. The unconditional first token has no logprob
    and counts as 0."""

    @property
    def requires_unconditional_logprobs(self) -> bool:
        return True

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs,
                 output_token_logprobs, unconditional_token_logprobs=None):  # fmt: skip
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional token logprobs are required for this method")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            u = [float(t[0] or 0.0) for t in uncond]
            c = [float(t[0] or 0.0) for t in cond]
            diffs = [a - b for a, b in zip(c, u)]
            scores.append(sum(diffs) / len(diffs) if diffs else float("-inf"))
        meta = _base_meta(normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs)
        meta["unconditional_token_logprobs"] = unconditional_token_logprobs
        meta["normalized_unconditional_prompt_logprobs"] = scores
        return ChoicesDecision(choices[_argmax(scores)], meta)


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
