"""Merge classes written the way participants wrote them for the starter kit (both eras).

They use only the kit's surface; the tests run them unchanged through our CLI and runner.
"""
import torch
from peft import get_peft_model, set_peft_model_state_dict

from llm_merging.merging.Linear import Linear
from llm_merging.merging.Merges import Merges


class KitLoraAvg(Merges):
    """Entry-points era: averages LoRA A and B matrices, never sets is_peft, bare-string list_models."""

    def __init__(self, name):
        super().__init__(name)
        self.list_models = ["org/expert-a", "org/expert-b"]  # replaced by --models in the tests
        self.base_model_name = "org/base"
        self.max_seq_len = None
        self.max_gen_len = 8
        self.device = torch.device("cpu")
        self.architecture = "decoder"
        self.loaded_models = {}
        self.loaded_configs = {}
        self.merged_model = {}

    def merge(self):
        super()._load_huggingface_models_and_configs()
        parameter_lambdas = [0.5, 0.5]
        all_models = list(self.loaded_models.values())
        for parameter_name in all_models[0].keys():
            merged = None
            for lam, model in zip(parameter_lambdas, all_models):
                p = model[parameter_name]
                merged = torch.clone(p) * lam if merged is None else merged + p * lam
            self.merged_model[parameter_name] = merged
        self._load_base_model()
        self._load_tokenizer()
        huggingface_config = list(self.loaded_configs.values())[0]
        self.base_model = get_peft_model(self.base_model, huggingface_config)
        set_peft_model_state_dict(self.base_model, self.merged_model)
        self.base_model.eval()
        return self.base_model


class KitFullAvg(Merges):
    """CSV era: full fine-tunes (is_peft = False), tuple list_models, load_state_dict into the base."""

    def __init__(self, name):
        super().__init__(name)
        self.list_models = [("org/full-a", "rev1"), ("org/full-b", "rev2")]
        self.base_model_name = "org/base"
        self.base_model_revision_id = "rev0"
        self.is_peft = False
        self.max_seq_len = None
        self.max_gen_len = 8
        self.device = torch.device("cpu")
        self.architecture = "decoder"
        self.loaded_models = {}
        self.loaded_configs = {}
        self.merged_model = {}

    def merge(self):
        super()._load_huggingface_models_and_configs()
        parameter_lambdas = [0.8, 0.2]
        all_models = list(self.loaded_models.values())
        for parameter_name in all_models[0].keys():
            merged = None
            for lam, model in zip(parameter_lambdas, all_models):
                p = model[parameter_name]
                merged = torch.clone(p) * lam if merged is None else merged + p * lam
            self.merged_model[parameter_name] = merged
        self._load_base_model()
        self._load_tokenizer()
        self.base_model.load_state_dict(self.merged_model)
        self.base_model.eval()
        return self.base_model


class AlwaysFirstChoice(Linear):
    """A participant class overriding predict_multiple_choice: always answers choice 0."""

    calls = 0

    def predict_multiple_choice(self, batch):
        type(self).calls += 1
        n = len(batch["input"])
        n_choices = len(batch["answer_choices"][0])
        scores = torch.zeros(n, n_choices)
        scores[:, 0] = 1.0
        return torch.zeros(n, dtype=torch.long), scores


class NanMerge(Linear):
    """A merge that produces NaN (error-path test)."""

    def merge_tensor(self, name, base, task_vectors):
        return task_vectors[0] * float("inf") * 0.0


class CountingLinear(Linear):
    """Counts evaluation calls (budget tests trip the budget after a few batches)."""

    calls = 0

    def predict_multiple_choice(self, batch):
        type(self).calls += 1
        return super().predict_multiple_choice(batch)

    def generate(self, batch):
        type(self).calls += 1
        return super().generate(batch)


class KitCudaDevice(KitFullAvg):
    """A kit class hard-coding the GPU, as the kit's own classes did on GPU machines."""

    def __init__(self, name):
        super().__init__(name)
        self.device = torch.device("cuda")
