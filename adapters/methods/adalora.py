"""AdaLoRA: LoRA in SVD form whose rank budget is reallocated to the layers that need it.

PEFT's AdaLoRA silently does nothing unless update_and_allocate() is called after every optimiser
step, and it needs total_step up front; both are handled here, not left to the caller.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from adapters.methods.base import (
    AdapterMethod,
    Auto,
    HyperparameterError,
    NotInBaseModel,
    bounded,
    given,
    is_module_name,
    register,
)
from adapters.methods.lora import (
    LORA_CONFIG_KEYS,
    PEFT_PREFIX,
    LoraFamilyHyperparameters,
    ResolvedLoraFamily,
    check_lora_family_config,
    check_target_modules,
    literal_patterns,
    lora_family_defaults,
    low_rank_weights,
)
from adapters.methods.serving import AdapterLoadError, LoraFactors, ServingKind, ServingWeights

DEFAULT_INIT_R = 12


class AdaLoraHyperparameters(LoraFamilyHyperparameters):
    init_r: int | Auto | None = bounded("starting rank of every module", 1, "max_lora_rank")
    target_r: int | Auto | None = bounded("average rank after budget pruning (at most init_r)", 1, "max_lora_rank")


class ResolvedAdaLora(ResolvedLoraFamily):
    init_r: int
    target_r: int


@register
class AdaLora(AdapterMethod[ResolvedAdaLora]):
    name = "adalora"
    peft_type = "ADALORA"
    hyperparameters = AdaLoraHyperparameters
    resolved = ResolvedAdaLora
    # Measured (bench/results/defaults.md): 2e-3 reached 14/24 on the shipped task in 3 epochs, 6e-3 24/24.
    default_learning_rate = 6e-3
    # Served as LoRA: the SVD triplets are folded into A/B at load time.
    serving_kind = ServingKind.LOW_RANK
    config_keys = LORA_CONFIG_KEYS | {"init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                                      "orth_reg_weight", "total_step"}

    def check(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        check_target_modules(hp.target_modules, base_info)
        init_r = hp.init_r if given(hp.init_r) else DEFAULT_INIT_R
        if given(hp.target_r) and hp.target_r > init_r:
            raise HyperparameterError("target_r", f"target_r ({hp.target_r}) must not exceed init_r ({init_r}"
                                                  f"{'' if given(hp.init_r) else ', the default'})")

    def method_defaults(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        init_r = hp.init_r if given(hp.init_r) else DEFAULT_INIT_R
        target_r = hp.target_r if given(hp.target_r) else max(1, min(8, init_r))
        # No dropout by default, as LoRA (and PEFT's default): its random masks were 17 % of a bf16 step on CPU,
        # and the shipped task learned as well without (bench/results/defaults_adalora.md).
        return {"init_r": init_r, "target_r": target_r, **lora_family_defaults(hp, base_info, init_r, dropout=0.0)}

    def peft_config(self, hp: ResolvedAdaLora, *, total_steps: int, base_model_path: str | None = None) -> Any:
        from peft import AdaLoraConfig, TaskType

        # Budget schedule: warm up on the full rank, prune during the middle, fine-tune at the end.
        tinit = total_steps // 10
        tfinal = total_steps // 5
        if total_steps - tinit - tfinal < 1:
            tinit, tfinal = 0, 0
        return AdaLoraConfig(task_type=TaskType.CAUSAL_LM, init_r=hp.init_r, target_r=hp.target_r,
                             lora_alpha=hp.lora_alpha,  # type: ignore[arg-type]  # a float works (see lora.py)
                             lora_dropout=hp.lora_dropout,
                             target_modules=hp.target_modules, total_step=total_steps,
                             tinit=tinit, tfinal=tfinal, deltaT=max(1, total_steps // 20))

    def before_training(self, peft_model: Any, compute_dtype: str) -> None:
        """Under bf16 autocast, keep each layer's rank count in the compute dtype. PEFT divides the adapter's
        output by it; as a one-element fp32 tensor it promotes every (tokens x features) output of every adapted
        layer to fp32 and back, forward and backward, which made an AdaLoRA step about 1.5x a LoRA step on CPU
        (measured). The count is a small integer, exact in bf16 up to 256 (a larger rank that bf16 would round keeps
        its fp32 count), and is never saved (PEFT sets it from r)."""
        import torch

        if compute_dtype == "float32":
            return
        dtype = getattr(torch, compute_dtype)
        for module in peft_model.modules():
            ranknum = getattr(module, "ranknum", None)
            if isinstance(ranknum, torch.nn.ParameterDict):
                for parameter in ranknum.values():
                    if torch.equal(parameter.data.to(dtype).float(), parameter.data.float()):
                        parameter.data = parameter.data.to(dtype)

    def adapter_to_continue(self, tensors: dict[str, Any], saved_config: dict[str, Any]) -> dict[str, Any]:
        """A saved AdaLoRA adapter is cut to its rank budget (PEFT keeps only the ranks `rank_pattern` marks), while
        a new model holds the full initial rank: each cut factor goes back to its kept ranks, zeros elsewhere, which
        is the same adapter (a pruned rank's singular value is zero) with room for the new job's budget."""
        import torch

        out = dict(tensors)
        for name, kept in (saved_config.get("rank_pattern") or {}).items():
            mask = torch.tensor(kept, dtype=torch.bool)
            # PEFT's names: "<module>.lora_E" (the adapter's name already dropped when it saved).
            prefix = "base_model.model." + name.rsplit(".", 1)[0]
            for factor, rank_dim in (("lora_E", 0), ("lora_A", 0), ("lora_B", 1)):
                key = f"{prefix}.{factor}"
                saved = out.get(key)
                if saved is None or saved.shape[rank_dim] == len(kept):
                    continue
                shape = list(saved.shape)
                shape[rank_dim] = len(kept)
                full = saved.new_zeros(shape)
                if rank_dim == 0:
                    full[mask] = saved
                else:
                    full[:, mask] = saved
                out[key] = full
        return out

    def after_loading_checkpoint(self, peft_model: Any, saved_config: dict[str, Any]) -> None:
        """The rank budget the checkpoint's steps had allocated (None before the first allocation): the final steps
        mask by it, and saving cuts the adapter to it."""
        adapter = peft_model.base_model.trainable_adapter_name
        peft_model.peft_config[adapter].rank_pattern = saved_config.get("rank_pattern")

    def after_optimizer_step(self, peft_model: Any, step: int) -> None:
        peft_model.base_model.update_and_allocate(step)

    def regularisation(self, peft_model: Any) -> Any:
        """PEFT's orthogonality penalty on the SVD factors (AdaLoraModel.forward adds it when given labels;
        our training path computes the loss itself, so it adds it here): the mean over factor matrices of
        ‖P·Pᵀ − I‖_F, times orth_reg_weight."""
        import torch

        adapter = peft_model.base_model.trainable_adapter_name
        weight = peft_model.peft_config[adapter].orth_reg_weight
        terms = []
        for name, parameter in peft_model.base_model.model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and adapter in name:
                covariance = parameter @ parameter.T if "lora_A" in name else parameter.T @ parameter
                identity = torch.eye(*covariance.size(), dtype=covariance.dtype, device=covariance.device)
                terms.append(torch.norm(covariance - identity, p="fro"))
        return weight * torch.stack(terms).mean() if terms else None

    def sanitise_config(self, config: dict[str, Any], *, max_rank: int,
                        module_names: Collection[str]) -> dict[str, Any]:
        check_lora_family_config(config, rank_key="init_r" if "init_r" in config else "r", max_rank=max_rank)
        kept = super().sanitise_config(config, max_rank=max_rank, module_names=module_names)
        if kept.get("alpha_pattern"):
            kept["alpha_pattern"] = literal_patterns("alpha_pattern", kept["alpha_pattern"], module_names,
                                                     max_rank=max_rank)
        if kept.get("rank_pattern"):
            kept["rank_pattern"] = self._rank_pattern(kept["rank_pattern"], module_names, max_rank=max_rank)
        return kept

    @staticmethod
    def _rank_pattern(pattern: Any, module_names: Collection[str], *, max_rank: int) -> dict[str, Any]:
        """AdaLoRA's rank_pattern is not LoRA's: the budget's mask per module, keyed by the parameter's full name
        ("<module>.lora_E"), which PEFT looks up as an attribute path (and also compiles, in a warning's check). A
        key must be exactly that, the module one of the base model's, compared as strings."""
        if not isinstance(pattern, dict):
            raise AdapterLoadError("adapter_config.json: rank_pattern must be an object of parameter names to masks")
        for key, mask in pattern.items():
            module = key.removesuffix(".lora_E") if isinstance(key, str) else ""
            if not is_module_name(key) or module == key or module not in module_names:
                raise NotInBaseModel(f"adapter_config.json: rank_pattern key {key!r} names no module of the base "
                                     "model; keys must be '<module name>.lora_E', not regular expressions")
            if not isinstance(mask, list) or len(mask) > max_rank or not all(isinstance(b, bool) for b in mask):
                raise AdapterLoadError(f"adapter_config.json: rank_pattern {key!r} must be a list of at most "
                                       f"{max_rank} true/false values")
        return pattern

    def serving_weights(self, config: dict[str, Any], weights: dict[str, Any], *, model_config: Any,
                        max_rank: int) -> ServingWeights:
        factors: dict[str, LoraFactors] = {}
        # PEFT's SVD layer computes B·(A⊙E)·alpha/(ranknum+1e-5), where ranknum stays the initial rank.
        ranknum = float(config.get("init_r") or config.get("r") or 1)
        alpha = config.get("lora_alpha") or ranknum
        for name, a in weights.items():
            if not name.endswith(".lora_A"):
                continue
            module = name[: -len(".lora_A")].removeprefix(PEFT_PREFIX)
            stem = name.rsplit(".", 1)[0]
            b, e = weights.get(f"{stem}.lora_B"), weights.get(f"{stem}.lora_E")
            if b is None or e is None:
                raise AdapterLoadError(f"{module}: AdaLoRA needs lora_A, lora_B and lora_E")
            if a.shape[0] == 0:  # the budget pruned this module to rank 0: it adds nothing
                continue
            factors[module] = LoraFactors(a=(a * e).float().contiguous(), b=b.float().contiguous(),
                                          scale=float(alpha / (ranknum + 1e-5)))
        return low_rank_weights(factors, max_rank)
