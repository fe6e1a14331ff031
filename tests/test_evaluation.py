"""The evaluator: batching, order, outputs (predictions, scores, submission CSV), budget, overrides."""
import csv
import json
import os

import pytest
import torch

from llm_merging import evaluation
from llm_merging.model import tiny
from llm_merging.data import load_examples
from llm_merging.core.errors import ConfigError
from llm_merging.evaluation import evaluate_model
from llm_merging.model import decoder_functions

KIT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                   "shared", "data", "starter_kit")


class TinyDecoderMethod:
    """Duck-typed stand-in for a kit Merges class around the tiny decoder."""

    architecture = "decoder"
    device = "cpu"
    max_gen_len = 4
    mc_scoring = "exact"

    def __init__(self, name="tiny_method"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(tiny.base_dir("decoder"))
        self.name = name
        self.base_model = _MODEL.setdefault("decoder", AutoModelForCausalLM.from_pretrained(path).eval())
        self.input_tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.input_tokenizer.pad_token = self.input_tokenizer.eos_token
        self.target_tokenizer = AutoTokenizer.from_pretrained(path, padding_side="right", add_bos_token=False,
                                                              add_eos_token=True)
        self.calls = []

    def get_name(self):
        return self.name

    def predict_multiple_choice(self, batch):
        self.calls.append(("mc", len(batch["input"])))
        return decoder_functions.predict_multiple_choice(
            self.base_model, self.input_tokenizer, self.target_tokenizer, batch, scoring=self.mc_scoring)

    def generate(self, batch):
        self.calls.append(("gen", len(batch["input"])))
        return decoder_functions.generate(self.base_model, self.input_tokenizer, self.target_tokenizer, batch,
                                          self.max_gen_len)


_MODEL: dict = {}


@pytest.fixture(scope="module")
def method():
    return TinyDecoderMethod()


def _write_test_csv(path):
    """A test.csv-style file: ids out of order, MC with 2/4/8 choices and generation, no targets."""
    rows = [
        ("17", "Question: Which of these is a fruit?\nAnswer:", "multiple_choice", "['apple', 'chair']"),
        ("3", "Write one sentence about the sea.", "generation", ""),
        ("a9", "Question: What do bees make?\nAnswer:", "multiple_choice", "['honey', 'steel', 'glass', 'paper']"),
        ("5", "Question: Which number is the largest?\nAnswer:", "multiple_choice",
         "['one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight']"),
        ("0", "Summarise: The school garden produced many vegetables this year. A summary is", "generation", ""),
        ("12", "Classify: similar or not? Output:", "generation", "['Similar', 'Dissimilar']"),
        ("44", "Question: Is the sky blue?\nAnswer:", "multiple_choice", "['yes', 'no']"),
    ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "input", "eval_type", "answer_choices"])
        w.writerows(rows)
    return rows


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_test_csv_gives_submission_in_input_order(tmp_path, method):
    src = tmp_path / "test.csv"
    rows = _write_test_csv(src)
    result = evaluate_model(method, [str(src)], str(tmp_path / "out"), progress=False)
    sub = _read_csv(tmp_path / "out" / "tiny_method" / "test_submission.csv")
    assert sub[0] == ["id", "prediction"]
    assert [r[0] for r in sub[1:]] == [r[0] for r in rows]
    for (rid, _, etype, choices), (_, pred) in zip(rows, sub[1:]):
        if etype == "multiple_choice":
            assert pred.isdigit() and int(pred) < len(eval(choices))
    ds = result.datasets[0]
    assert ds.n_examples == ds.n_evaluated == len(rows) and not ds.partial and ds.scores == {}
    assert ds.eval_types == ["generation", "multiple_choice"]
    # kit batches: one eval type and one choice count per batch
    assert {kind for kind, _ in method.calls} == {"mc", "gen"}


def test_predictions_scores_and_appended_scores_line(tmp_path, method):
    files = tiny.sample_data_files()[:2]
    out = tmp_path / "out"
    r1 = evaluate_model(method, files, str(out), batch_size=4, progress=False)
    r2 = evaluate_model(method, files, str(out), batch_size=2, progress=False)
    lines = (out / "tiny_method" / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 2
    line = json.loads(lines[0])
    assert set(line) == {"cosmos_qa_sample", "xsum_sample", "average"}
    assert set(line["xsum_sample"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert line["cosmos_qa_sample"]["accuracy"] == round(r1.datasets[0].scores["accuracy"], 3)
    assert all(v == round(v, 3) for d in line.values() for v in d.values())
    assert r1.scores == r2.scores  # batch size does not change predictions
    preds = [json.loads(x) for x in (out / "tiny_method" / "predictions" / "cosmos_qa_sample.jsonl").read_text().splitlines()]
    src = load_examples(files[0])
    assert [p["input"] for p in preds] == [r["input"] for r in src]  # input order restored
    for p in preds:
        assert p["prediction"] == p["predicted_choice"] == max(range(4), key=p["answer_choices_scores"].__getitem__)
        assert p["label"] in range(4) and len(p["answer_choices_scores"]) == len(p["answer_choices"])
    acc = sum(p["prediction"] == p["label"] for p in preds) / len(preds)
    assert r1.datasets[0].scores["accuracy"] == pytest.approx(acc)
    gen = [json.loads(x) for x in (out / "tiny_method" / "predictions" / "xsum_sample.jsonl").read_text().splitlines()]
    assert all(isinstance(g["prediction"], str) and g["prediction"] == g["predicted_text"] for g in gen)
    json.dumps(r1.to_dict())  # report.json material
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # atomic writes leave nothing behind


def test_batch_size_does_not_change_predictions(tmp_path, method):
    src = tmp_path / "test.csv"
    _write_test_csv(src)
    subs = []
    for bs in (1, 3, "auto"):
        evaluate_model(method, [str(src)], str(tmp_path / f"o{bs}"), batch_size=bs, progress=False)
        subs.append(_read_csv(tmp_path / f"o{bs}" / "tiny_method" / "test_submission.csv"))
    assert subs[0] == subs[1] == subs[2]


class LastChoice(TinyDecoderMethod):
    """A participant class overriding both kit methods."""

    def predict_multiple_choice(self, batch):
        n = [len(c) for c in batch["answer_choices"]]
        scores = torch.zeros(len(n), max(n))
        return torch.tensor([k - 1 for k in n]), scores

    def generate(self, batch):
        return [[0]] * len(batch["input"]), ["hello there"] * len(batch["input"])


def test_participant_overrides_are_used(tmp_path):
    src = tmp_path / "test.csv"
    rows = _write_test_csv(src)
    evaluate_model(LastChoice("participant"), [str(src)], str(tmp_path / "out"), progress=False)
    sub = _read_csv(tmp_path / "out" / "participant" / "test_submission.csv")
    for (rid, _, etype, choices), (sid, pred) in zip(rows, sub[1:]):
        assert sid == rid
        assert pred == (str(len(eval(choices)) - 1) if etype == "multiple_choice" else "hello there")


def test_kit_style_method_sees_one_choice_count_per_batch(tmp_path, method):
    class Strict(TinyDecoderMethod):
        def predict_multiple_choice(self, batch):
            counts = {len(c) for c in batch["answer_choices"]}
            assert len(counts) == 1  # the kit's code divides flat choices by the batch size
            return super().predict_multiple_choice(batch)

    src = tmp_path / "test.csv"
    _write_test_csv(src)
    evaluate_model(Strict("strict"), [str(src)], str(tmp_path / "out"), batch_size=8, progress=False)


class TripBudget:
    def __init__(self, calls, after):
        self.calls, self.after = calls, after

    def remaining(self):
        return -1.0 if len(self.calls) >= self.after else 1e9


def test_budget_stops_between_batches_and_keeps_finished_work(tmp_path, method):
    files = tiny.sample_data_files()[:2]
    method.calls.clear()
    result = evaluate_model(method, files, str(tmp_path / "out"), batch_size=2,
                            budget=TripBudget(method.calls, after=2), progress=False)
    first, second = result.datasets
    assert result.partial and first.partial and second.partial
    assert first.n_evaluated == 4 and first.n_examples == 6 and second.n_evaluated == 0
    preds = (tmp_path / "out" / "tiny_method" / "predictions" / "cosmos_qa_sample.jsonl").read_text().splitlines()
    assert len(preds) == 4
    line = json.loads((tmp_path / "out" / "tiny_method" / "scores.jsonl").read_text())
    assert line["cosmos_qa_sample"]["partial"] is True and line["xsum_sample"] == {"partial": True}


def test_out_of_memory_halves_the_batch_without_losing_examples(tmp_path, method):
    class Fragile(TinyDecoderMethod):
        def predict_multiple_choice(self, batch):
            if len(batch["input"]) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().predict_multiple_choice(batch)

    result = evaluate_model(Fragile("fragile"), tiny.sample_data_files()[:1], str(tmp_path / "out"), batch_size=8,
                            progress=False)
    ds = result.datasets[0]
    assert ds.n_evaluated == ds.n_examples == 6 and ds.batch_size == 2 and not ds.partial


def test_pace_check_warns_when_rest_does_not_fit(caplog):
    pace = evaluation._Pace({"multiple_choice": 100, "generation": 50})

    class Budget:
        def remaining(self):
            return 5.0

    with caplog.at_level("WARNING", logger="llm_merging.evaluation"):
        pace.add("multiple_choice", 1.0, 10)
        pace.check("multiple_choice", Budget())
        pace.add("multiple_choice", 1.0, 10)
        pace.check("multiple_choice", Budget())
    assert any("may not fit the time budget" in r.message for r in caplog.records)
    assert pace.projected() == pytest.approx(80 * 0.1 + 50 * 0.1)


def test_eval_types_argument_and_config_errors(tmp_path, method):
    cosmos = tiny.sample_data_files()[0]
    result = evaluate_model(method, [cosmos], str(tmp_path / "o"), eval_types=["generation"], progress=False,
                            max_examples=2)
    assert result.datasets[0].eval_types == ["generation"] and "accuracy" not in result.datasets[0].scores
    assert "rougeL" in result.datasets[0].scores  # the targets ("A", "B", ...) become references
    with pytest.raises(ConfigError):
        evaluate_model(method, [cosmos, cosmos], str(tmp_path / "o"), eval_types=["generation"] * 3, progress=False)
    with pytest.raises(ConfigError):
        evaluate_model(method, [cosmos], str(tmp_path / "o"), batch_size=0, progress=False)
    with pytest.raises(ConfigError):
        evaluate_model(method, [cosmos], str(tmp_path / "o"), eval_types="ranking", progress=False)


def test_same_stem_in_two_formats_gets_two_prediction_files(tmp_path, method):
    (tmp_path / "a").mkdir()
    j = tmp_path / "a" / "data.json"
    j.write_text(json.dumps({"input": "Summarise: cats.", "target": "Cats."}) + "\n")
    c = tmp_path / "data.csv"
    c.write_text("id,input,target\n1,Summarise: dogs.,Dogs.\n")
    result = evaluate_model(method, [str(j), str(c)], str(tmp_path / "o"), progress=False)
    assert [d.name for d in result.datasets] == ["data_json", "data_csv"]
    assert (tmp_path / "o" / "tiny_method" / "predictions" / "data_json.jsonl").exists()
    assert (tmp_path / "o" / "tiny_method" / "data_csv_submission.csv").exists()


def test_auto_batch_size_cpu_and_memory_estimate(method):
    rows = load_examples(tiny.sample_data_files()[0])
    assert evaluation.auto_batch_size(method, "multiple_choice", rows) == evaluation.CPU_BATCH_SIZE["multiple_choice"]
    cfg = method.base_model.config
    small = evaluation.estimate_example_bytes(cfg, 2, "multiple_choice", 100, 4, 5)
    large = evaluation.estimate_example_bytes(cfg, 2, "multiple_choice", 1000, 4, 5)
    gen = evaluation.estimate_example_bytes(cfg, 2, "generation", 1000, gen_tokens=64)
    assert 0 < small < large and gen > 0


@pytest.mark.skipif(not os.path.isdir(KIT), reason="starter-kit data not available")
def test_starter_kit_files_evaluate(tmp_path, method):
    files = [os.path.join(KIT, "validation", "cosmos_qa.csv"), os.path.join(KIT, "validation", "xsum.csv"),
             os.path.join(KIT, "test.csv"), os.path.join(KIT, "cosmos_qa.json")]
    result = evaluate_model(method, files, str(tmp_path / "o"), max_examples=5, progress=False)
    names = [d.name for d in result.datasets]
    assert names == ["cosmos_qa_csv", "xsum", "test", "cosmos_qa_json"]
    assert all(d.n_evaluated == 5 and not d.partial for d in result.datasets)
    assert 0 <= result.datasets[0].scores["accuracy"] <= 1 and "rougeL" in result.datasets[1].scores
    assert result.datasets[0].scores == result.datasets[3].scores  # same questions, CSV and JSON lines
    sub = _read_csv(tmp_path / "o" / "tiny_method" / "test_submission.csv")
    assert [r[0] for r in sub[1:]] == [str(i) for i in range(5)]
