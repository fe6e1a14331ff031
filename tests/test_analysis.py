"""Insight: task-vector analysis figures against independent computations, identical experts, LoRA vs full
experts with the same ΔW, the analyze CLI, baselines against direct evaluation, report.html of runs with and
without evaluation and of a stopped run."""
import base64
import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from llm_merging.model import tiny
from llm_merging.insight.analysis import (
    analyze_method,
    effective_rank,
    lora_singular_values,
    tensor_group,
    tensor_stats,
    verdicts,
)
from llm_merging.report.html import SECTIONS
from llm_merging.main import main

MC_FILE = tiny.sample_data_files()[0]  # multiple choice: fast to evaluate


# ------------------------------------------------------------------------------------- independent math
def _np_topk_mask(x, density):
    k = int(round(density * x.size))
    order = np.argsort(-np.abs(x), kind="stable")
    mask = np.zeros(x.size, dtype=bool)
    mask[order[:k]] = True
    return mask & (x != 0)


def _np_pair(a, b, ma, mb):
    both = (a != 0) & (b != 0)
    dense = np.sum(both & (np.sign(a) != np.sign(b))) / both.sum()
    a_d, b_d = np.where(ma, a, 0), np.where(mb, b, 0)
    both_d = (a_d != 0) & (b_d != 0)
    trimmed = np.sum(both_d & (np.sign(a_d) != np.sign(b_d))) / both_d.sum()
    jaccard = np.sum(ma & mb) / np.sum(ma | mb)
    return dense, trimmed, jaccard


def test_tensor_figures_match_an_independent_computation():
    gen = torch.Generator().manual_seed(0)
    tensors = [[torch.randn(12, 20, generator=gen) for _ in range(3)], [torch.randn(50, generator=gen) for _ in range(3)]]
    tensors[0][2][:, :5] = 0  # zeros are neither sign
    densities = [0.3, 0.5, 1.0]
    total = None
    for tvs in tensors:
        st = tensor_stats(tvs, densities)
        total = st if total is None else total.add(st)
    s = total.summary()
    flat = [np.concatenate([t[i].double().numpy().reshape(-1) for t in tensors]) for i in range(3)]
    masks = [np.concatenate([_np_topk_mask(t[i].numpy().reshape(-1), densities[i]) for t in tensors]) for i in range(3)]
    for i in range(3):
        assert s["norm"][i] == pytest.approx(np.linalg.norm(flat[i]), rel=1e-6)
        for j in range(i + 1, 3):
            cos = flat[i] @ flat[j] / (np.linalg.norm(flat[i]) * np.linalg.norm(flat[j]))
            dense, trimmed, jac = _np_pair(flat[i], flat[j], masks[i], masks[j])
            assert s["cosine"][i][j] == pytest.approx(cos, abs=1e-6) and s["cosine"][j][i] == s["cosine"][i][j]
            assert s["sign_conflict"]["dense"][i][j] == pytest.approx(dense, abs=1e-12)
            assert s["sign_conflict"]["density"][i][j] == pytest.approx(trimmed, abs=1e-12)
            assert s["mask_overlap"][i][j] == pytest.approx(jac, abs=1e-12)
    for key, ms in (("dense", [f != 0 for f in flat]), ("density", masks)):
        signs = np.stack([np.where(m, np.sign(f), 0) for f, m in zip(flat, ms)])
        multi = (signs != 0).sum(0) >= 2
        mixed = multi & (signs > 0).any(0) & (signs < 0).any(0)
        assert s["all_experts_conflict"][key] == pytest.approx(mixed.sum() / multi.sum(), abs=1e-12)
    assert s["kept_share"][0] == pytest.approx(masks[0].sum() / flat[0].size)


def test_effective_rank_is_roy_vetterli_of_the_product():
    gen = torch.Generator().manual_seed(1)
    b, a = torch.randn(40, 6, generator=gen), torch.randn(6, 30, generator=gen)
    sv = lora_singular_values(b, a)
    ref = np.linalg.svd(b.double().numpy() @ a.double().numpy(), compute_uv=False)
    assert np.allclose(sorted(sv.numpy(), reverse=True), ref[:6], rtol=1e-8)
    p = ref[ref > 1e-9 * ref[0]] / ref.sum()
    assert effective_rank(sv) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-8)
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(4)) == 0.0


def test_tensor_groups():
    assert tensor_group("model.layers.3.self_attn.q_proj.weight") == (("model.layers", 3), "self_attn.q_proj", "attention")
    assert tensor_group("model.layers.0.mlp.down_proj.weight")[2] == "mlp"
    assert tensor_group("encoder.block.1.layer.1.DenseReluDense.wi.weight")[0] == ("encoder.block", 1)
    assert tensor_group("encoder.block.1.layer.1.DenseReluDense.wi.weight")[2] == "mlp"
    assert tensor_group("model.embed_tokens.weight") == (None, "model.embed_tokens", "embedding")
    assert tensor_group("model.norm.weight")[2] == "norm"


# ------------------------------------------------------------------------------------- whole models
def _method(base, models):
    from llm_merging.merging.base import TaskVectorMerge

    m = TaskVectorMerge("analyze")
    m.base_model_name, m.base_model_revision_id = str(base), None
    m.list_models = [str(p) for p in models]
    m.is_peft = None
    m.preflight()
    return m


def test_identical_experts_have_cosine_one_and_no_conflict():
    lora = tiny.lora_expert_dir("decoder", 1)
    doc = analyze_method(_method(tiny.base_dir("decoder"), [lora, lora]), progress=False)
    ov = doc["overall"]
    assert ov["cosine"][0][1] == pytest.approx(1.0)
    assert ov["sign_conflict"]["density"][0][1] == 0.0 and ov["sign_conflict"]["dense"][0][1] == 0.0
    assert ov["all_experts_conflict"]["dense"] == 0.0
    assert ov["mask_overlap"][0][1] == 1.0
    assert ov["norm"][0] == ov["norm"][1] > 0
    assert all(layer["sign_conflict"]["dense"][0][1] == 0.0 for layer in doc["by_layer"])
    assert doc["verdicts"][0]["level"] == "identical"
    assert 1.0 <= ov["effective_rank"][0] <= 8.0 and ov["lora_rank"][0] == 8.0


@pytest.fixture(scope="module")
def full_twin_of_lora(tmp_path_factory):
    """A full fine-tune whose weights are base + the LoRA expert's ΔW (merged by PEFT, not by us)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("full-twin")
    base = AutoModelForCausalLM.from_pretrained(str(tiny.base_dir("decoder")))
    merged = PeftModel.from_pretrained(base, str(tiny.lora_expert_dir("decoder", 1))).merge_and_unload()
    merged.save_pretrained(str(out))
    return out


def test_lora_and_full_expert_with_the_same_delta_give_the_same_numbers(full_twin_of_lora):
    base, other = tiny.base_dir("decoder"), tiny.lora_expert_dir("decoder", 0)
    a = analyze_method(_method(base, [other, tiny.lora_expert_dir("decoder", 1)]), progress=False, full_rank=True)
    b = analyze_method(_method(base, [other, full_twin_of_lora]), progress=False, full_rank=True)
    assert [e["kind"] for e in b["experts"]] == ["lora", "full"]

    def close(x, y):
        if isinstance(x, list):
            assert len(x) == len(y)
            for u, v in zip(x, y):
                close(u, v)
        elif x is None or y is None:
            assert x is None and y is None
        else:
            assert x == pytest.approx(y, rel=1e-4, abs=1e-4)

    for key in ("norm", "cosine", "mask_overlap", "effective_rank", "kept_share"):
        close(a["overall"][key], b["overall"][key])
    close(a["overall"]["sign_conflict"]["density"], b["overall"]["sign_conflict"]["density"])
    close(a["overall"]["sign_conflict"]["dense"], b["overall"]["sign_conflict"]["dense"])
    for la, lb in zip(a["by_layer"], b["by_layer"]):
        close(la["norm"], lb["norm"])
        close(la["sign_conflict"]["density"], lb["sign_conflict"]["density"])
        close(la["effective_rank"], lb["effective_rank"])
    assert [v["level"] for v in a["verdicts"]] == [v["level"] for v in b["verdicts"]]


def test_verdict_rule_names_the_high_conflict_layers():
    def layer(i, conflict):
        fam = {"sign_conflict": {"density": [[0, conflict], [conflict, 0]]}}
        return {"stack": "model.layers", "index": i, "families": {"mlp": fam, "attention": {"sign_conflict": {"density": [[0, 0.1], [0.1, 0]]}}}}

    doc = {"experts": [{"label": "a"}, {"label": "b"}], "density": [0.2, 0.2], "stacks": ["model.layers"],
           "overall": {"cosine": [[1, 0.2], [0.2, 1]], "sign_conflict": {"density": [[0, 0.3], [0.3, 0]]}},
           "by_layer": [layer(i, 0.45 if 20 <= i <= 31 else 0.1) for i in range(32)]}
    (v,) = verdicts(doc)
    assert v["level"] == "conflict"
    assert "high conflict in MLP layers 20–31" in v["text"] and "TIES" in v["text"] and "attention" not in v["text"]
    doc["by_layer"] = [layer(i, 0.1) for i in range(32)]
    doc["overall"]["cosine"] = [[1, 0.01], [0.01, 1]]
    assert verdicts(doc)[0]["level"] == "orthogonal"


def test_analyze_cli_writes_json_plots_and_report(tmp_path, capsys):
    base = tiny.base_dir("decoder")
    models = [tiny.lora_expert_dir("decoder", 0), tiny.full_expert_dir("decoder", 0)]
    assert main(["analyze", "--base-model", str(base), "--models", *map(str, models), "--density", "0.3",
                 "--output_folder", str(tmp_path), "--quiet"]) == 0
    out = tmp_path / "analysis"
    doc = json.loads((out / "analysis.json").read_text())
    assert doc["density"] == [0.3, 0.3] and [e["kind"] for e in doc["experts"]] == ["lora", "full"]
    assert doc["tensors_analyzed"] == doc["tensors_touched"] > 0 and doc["verdict_rule"]
    for name in ("cosine_heatmap", "sign_conflict_per_layer", "norms_per_layer"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = _parse(out / "report.html")
    assert {"command", "models", "analysis"} <= page.sections and len(page.images) >= 3
    assert "analysis.json" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["--density", "1.5"], "--density"),
    (["--density", "0.2,0.3,0.4"], "--density"),
    (["--device", "tpu"], "--device"),
])
def test_analyze_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    code = main(["analyze", "--base-model", str(tiny.base_dir("decoder")), "--models",
                 str(tiny.lora_expert_dir("decoder", 0)), "--output_folder", str(tmp_path), "-q", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "analysis").exists()


def test_analyze_cli_missing_model(tmp_path, capsys):
    code = main(["analyze", "--base-model", str(tiny.base_dir("decoder")), "--models", str(tmp_path / "absent"),
                 "--output_folder", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "absent" in err[0]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- report.html
class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.images, self.links, self.stack, self.scripts = set(), [], [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in ("meta", "img", "br", "hr", "link", "input"):
            self.stack.append(tag)
        if tag == "section":
            self.sections.add(a.get("id"))
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "a":
            self.links.append(a.get("href", ""))
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def _parse(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    page = _Page()
    page.feed(text)
    page.close()
    assert not page.stack, f"unclosed tags: {page.stack}"
    assert page.scripts == 0 and "http://" not in text and "https://" not in text
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    page.text = text
    return page


@pytest.fixture(scope="module")
def insight_run(tmp_path_factory):
    """One run with evaluation, --analyze and --baselines: a LoRA and a full expert."""
    out = tmp_path_factory.mktemp("insight")
    models = [str(tiny.lora_expert_dir("decoder", 0)), str(tiny.full_expert_dir("decoder", 1))]
    code = main(["-m", "ties_merge", "--base-model", str(tiny.base_dir("decoder")), "--models", *models,
                 "--set", "density=0.5", "--dataset_filepaths", MC_FILE, "--max-examples", "3", "--save", "none",
                 "--analyze", "--baselines", "--output_folder", str(out), "--quiet", "--device", "cpu"])
    return code, out / "ties_merge", models


def test_run_report_html_has_every_section_and_embedded_plots(insight_run):
    code, d, _ = insight_run
    assert code == 0
    page = _parse(d / "report.html")
    assert set(SECTIONS) <= page.sections
    assert len(page.images) >= 6  # time per phase, scores, cosine, conflict, norms, effective rank
    assert "predictions/cosmos_qa_sample.jsonl" in page.links
    assert "baselines/base/predictions/cosmos_qa_sample.jsonl" in page.links
    assert "Normalised scores" in page.text and "Verdicts" in page.text and "TIES density 0.5" in page.text
    for name in ("scores", "time_per_phase", "cosine_heatmap", "sign_conflict_per_layer", "norms_per_layer"):
        assert (d / "plots" / f"{name}.png").is_file()
    doc = json.loads((d / "analysis.json").read_text())
    assert doc["density"] == [0.5, 0.5]  # the method's own density
    assert doc["math_device"] == "cpu"  # the run's --device
    report = json.loads((d / "report.json").read_text())
    assert report["analysis"]["verdicts"] and "analyze" in report["phases_seconds"]


def test_baselines_equal_evaluating_those_models_directly(insight_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llm_merging.evaluation import evaluate_model
    from llm_merging.merging.factory import instantiate

    code, d, models = insight_run
    assert code == 0
    report = json.loads((d / "report.json").read_text())
    bl = {m["label"]: m for m in report["baselines"]["models"]}
    assert [m["kind"] for m in report["baselines"]["models"]] == ["base", "lora", "full"]

    method = instantiate("linear")
    method.base_model_name, method.base_model_revision_id = str(tiny.base_dir("decoder")), None
    method.device, method.dtype, method.architecture = "cpu", "float32", "decoder"
    method._load_tokenizer()
    candidates = {
        "base": lambda: AutoModelForCausalLM.from_pretrained(str(tiny.base_dir("decoder"))),
        "lora": lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny.base_dir("decoder"))),
                                                  models[0]).merge_and_unload(),
        "full": lambda: AutoModelForCausalLM.from_pretrained(models[1]),
    }
    for entry in report["baselines"]["models"]:
        method.base_model = candidates[entry["kind"]]().eval()
        method.name = f"direct-{entry['kind']}"
        result = evaluate_model(method, [MC_FILE], str(tmp_path), max_examples=3, progress=False)
        assert result.datasets[0].scores == entry["scores"]["cosmos_qa_sample"], entry["label"]
        direct = [json.loads(x) for x in (tmp_path / method.name / "predictions" / "cosmos_qa_sample.jsonl").read_text().splitlines()]
        ours = [json.loads(x) for x in open(entry["predictions"]["cosmos_qa_sample"])]
        assert [r["prediction"] for r in direct] == [r["prediction"] for r in ours]
        for r, o in zip(direct, ours):
            assert np.allclose(r["answer_choices_scores"], o["answer_choices_scores"], rtol=1e-4, atol=1e-4)
    merged = report["evaluation"]["datasets"][0]["scores"]["accuracy"]
    best = max(bl[k]["scores"]["cosmos_qa_sample"]["accuracy"] for k in bl if k != "base")
    norm = report["baselines"]["normalised"]["cosmos_qa_sample"]["accuracy"]
    assert norm == (pytest.approx(merged / best) if best > 0 else None)


def test_report_html_of_a_run_without_evaluation(tmp_path, monkeypatch):
    models = [str(tiny.lora_expert_dir("decoder", i)) for i in range(2)]
    assert main(["-m", "task_arithmetic", "--base-model", str(tiny.base_dir("decoder")), "--models", *models,
                 "--no-eval", "--save", "none", "--analyze", "--output_folder", str(tmp_path), "--quiet"]) == 0
    page = _parse(tmp_path / "task_arithmetic" / "report.html")
    assert set(SECTIONS) <= page.sections and len(page.images) >= 4  # time per phase and the analysis plots
    assert "evaluation was not run" in page.text and "Verdicts" in page.text
    doc = json.loads((tmp_path / "task_arithmetic" / "analysis.json").read_text())
    assert doc["density"] == [0.2, 0.2]  # task_arithmetic has no density: the TIES default


def test_a_failure_to_draw_never_changes_the_exit_status(tmp_path, monkeypatch, caplog):
    from llm_merging.report import html as html_report

    def broken(*args, **kwargs):
        raise RuntimeError("no ink")

    monkeypatch.setattr(html_report, "write_html_report", broken)
    assert main(["-m", "linear", "--tiny", "--no-eval", "--save", "none", "--output_folder", str(tmp_path),
                 "--quiet"]) == 0
    assert "no ink" in caplog.text and not (tmp_path / "linear" / "report.html").exists()
    assert (tmp_path / "linear" / "report.json").exists()


def test_report_html_of_a_stopped_run(tmp_path, capsys):
    code = main(["-m", "ties_merge", "--tiny", "--time-budget", "0.01", "--output_folder", str(tmp_path),
                 "--quiet", "--analyze", "--baselines", "--dataset_filepaths", MC_FILE])
    assert code == 3
    page = _parse(tmp_path / "ties_merge" / "report.html")
    assert set(SECTIONS) <= page.sections and page.images
    assert "partial" in page.text and "time budget" in page.text


def test_baselines_need_evaluation(tmp_path, capsys):
    code = main(["-m", "linear", "--tiny", "--no-eval", "--baselines", "--output_folder", str(tmp_path), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--baselines" in err[0] and "--no-eval" in err[0]
    assert not (tmp_path / "linear").exists()


def test_budget_running_out_during_the_analysis_keeps_what_was_analysed(tmp_path):
    import contextlib

    from llm_merging.core.budget import Budget
    from llm_merging.pipeline import InsightConfig, RunConfig, Runner

    class StopsInAnalysis(Budget):
        def __init__(self):
            super().__init__(3600)
            self.active, self.asked = None, 0

        @contextlib.contextmanager
        def phase(self, name):
            self.active = name
            with super().phase(name):
                yield

        def expired(self):
            if self.active == "analyze":
                self.asked += 1
                return self.asked > 3
            return False

    cfg = RunConfig(method="ties_merge", tiny=True, output_folder=str(tmp_path), evaluate=False, save="none",
                    insight=InsightConfig(analyze=True), progress=False)
    assert Runner(cfg, budget=StopsInAnalysis()).run() == 3
    d = tmp_path / "ties_merge"
    doc = json.loads((d / "analysis.json").read_text())
    assert doc["partial"] is True and doc["tensors_analyzed"] == 3 < doc["tensors_touched"]
    report = json.loads((d / "report.json").read_text())
    assert report["exit_status"] == 3 and "analysis" in report["error"]
    page = _parse(d / "report.html")
    assert "partial: the budget stopped the analysis" in page.text
