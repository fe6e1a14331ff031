"""Model references, lazy checkpoint reading, LoRA task vectors, loading and saving."""


def auto_model_class(architecture: str):
    """The transformers Auto class of an architecture: ``encoder_decoder`` → Seq2SeqLM, else CausalLM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if architecture == "encoder_decoder" else AutoModelForCausalLM


def is_conv1d(module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a dense layer whose weight W is stored as (in, out), the transpose of
    ``nn.Linear``'s (matched by type name, so that transformers' class is never imported for the check)."""
    return type(module).__name__ == "Conv1D"


def vocab_modules(model) -> list:
    """The model's input embedding and output head modules (those it has; one entry when tied to the same
    module), from transformers' ``get_input_embeddings`` / ``get_output_embeddings``."""
    out: list = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None and all(module is not m for m in out):
            out.append(module)
    return out
