"""GSM8K answer extraction and exact match, as lm-evaluation-harness 0.4.13's `gsm8k_cot` scores it.

Load offline with `evaluate.load("<path to this folder>")`. The maths lives in `llama2_hf.evaluation.scoring`, which
the `llama2-hf eval` task runner uses too.
"""

import datasets
import evaluate

from llama2_hf.evaluation.scoring import gsm8k_exact_match, gsm8k_extract, gsm8k_gold

_DESCRIPTION = """Extracts the final answer of each GSM8K chain of thought two ways and scores it against the gold
number: `strict` takes the first "The answer is N." (the 8-shot exemplars' format), `flexible` the last number in the
text. Both sides are compared after dropping commas, `$`, any text up to "#### " and a final period, lowercased."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): model generations (already cut at the stop strings).
    references (`list` of `str`): gold answers, either GSM8K's full answer field ending in "#### N" or just "N".
Returns:
    exact_match_strict (`float`): fraction of generations whose strict extraction matches.
    exact_match_flexible (`float`): fraction whose flexible extraction matches.
Examples:
    >>> metric = evaluate.load("llama2_hf/metrics/gsm8k_exact_match")
    >>> metric.compute(predictions=["5 + 3 = 8. The answer is 8.", "So 1,200 dollars"],
    ...                references=["#### 8", "#### 1200"])
    {'exact_match_strict': 0.5, 'exact_match_flexible': 1.0}
"""

_CITATION = """@article{cobbe2021gsm8k, title={Training Verifiers to Solve Math Word Problems},
author={Cobbe, Karl and others}, journal={arXiv preprint arXiv:2110.14168}, year={2021}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Gsm8kExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("gsm8k_exact_match needs at least one prediction")
        golds = [gsm8k_gold(r) for r in references]
        out = {}
        for mode in ("strict", "flexible"):
            hits = [gsm8k_exact_match(gsm8k_extract(p, mode), g) for p, g in zip(predictions, golds)]
            out[f"exact_match_{mode}"] = sum(hits) / len(hits)
        return out
