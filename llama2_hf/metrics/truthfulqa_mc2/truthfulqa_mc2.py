"""TruthfulQA MC2: the normalised probability mass of the true answers, averaged over questions.

Load offline with `evaluate.load("<path to this folder>")`. The maths lives in `llama2_hf.evaluation.scoring`.
"""

import datasets
import evaluate

from llama2_hf.evaluation.scoring import mc2_score

_DESCRIPTION = """For each question, the log-likelihoods of all its MC2 answers are turned into probabilities
(exp, normalised over the question's answers) and the mass on the true answers is the question's score; the metric
is the mean over questions (lm-evaluation-harness `truthfulqa_mc2`)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): per question, the log-likelihood of each answer.
    references (`list` of `list` of `int`): per question, 1 for true answers and 0 for false ones.
Returns:
    mc2 (`float`): mean probability mass of the true answers.
Examples:
    >>> metric = evaluate.load("llama2_hf/metrics/truthfulqa_mc2")
    >>> metric.compute(predictions=[[0.0, 0.0, 0.0, 0.0]], references=[[1, 0, 0, 0]])
    {'mc2': 0.25}
"""

_CITATION = """@inproceedings{lin2022truthfulqa, title={TruthfulQA: Measuring How Models Mimic Human Falsehoods},
author={Lin, Stephanie and Hilton, Jacob and Evans, Owain}, booktitle={ACL}, year={2022}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TruthfulqaMc2(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Sequence(datasets.Value("int32"))}),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("truthfulqa_mc2 needs at least one question")
        scores = [mc2_score(p, r) for p, r in zip(predictions, references)]
        return {"mc2": sum(scores) / len(scores)}
