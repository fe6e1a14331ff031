"""Model references, lazy checkpoint reading, LoRA task vectors, loading and saving."""


def auto_model_class(architecture: str):
    """The transformers Auto class of an architecture: ``encoder_decoder`` → Seq2SeqLM, else CausalLM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if architecture == "encoder_decoder" else AutoModelForCausalLM
