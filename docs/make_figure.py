"""Draw docs/analysis_cosine.png (the README's picture) from the tiny offline models.

Experts: two tiny LoRA adapters and a full fine-tune whose weights are the base plus the second adapter's
ΔW (merged by PEFT), so the heatmap shows one LoRA/full pair with cosine 1 and unrelated experts near 0.
Usage: ``python docs/make_figure.py``.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llm_merging.report import plots
    from llm_merging.model import tiny
    from llm_merging.insight.analysis import analyze_method
    from llm_merging.merging.base import TaskVectorMerge

    base = tiny.base_dir("decoder")
    loras = [tiny.lora_expert_dir("decoder", i) for i in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        twin = Path(tmp) / "full-twin-of-lora-1"
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(loras[1]))
        model.merge_and_unload().save_pretrained(str(twin))
        method = TaskVectorMerge("analyze")
        method.base_model_name, method.base_model_revision_id = str(base), None
        method.list_models, method.is_peft = [str(p) for p in loras] + [str(twin)], None
        method.preflight()
        doc = analyze_method(method, progress=False)
    out = plots.write_png(ROOT / "docs" / "analysis_cosine.png", plots.cosine_heatmap(doc))
    print(out)


if __name__ == "__main__":
    main()
