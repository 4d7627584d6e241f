"""Keep DeepSeekMoE balanced while TRL (or any transformers Trainer) fine-tunes: the auxiliary-loss-free router-bias
update after each optimizer step, and per-layer MaxVio / expert load in the trainer's logs.

    from modeling_deepseek_v3.training.callbacks import MoEBalanceCallback
    callback = MoEBalanceCallback.attach(trainer, gamma=1e-3)   # update_biases=False: log only, biases stay put
    trainer.train()

Where the loads come from: the model returns them (`expert_load` [n_moe_layers, E], padding excluded) in its outputs;
no MoE-module hook is used, so gradient-checkpoint recomputation (which re-runs the decoder layers) cannot count a
micro-batch twice. Two forward hooks read them:
- on the causal LM: its own forward returns the loads of the main and MTP layers;
- on the backbone (DSV3Model): TRL's fused LM head calls the backbone directly and returns log-probs without loads,
  so the backbone's loads of that call (main layers only; MTP does not run there) stand in.
Only forwards in training mode with gradients enabled count: generation, reference-model and old-log-prob passes
(all under no_grad) do not. Loads are summed over the micro-batches of one optimizer step (and over ranks, in
`ExpertLoadTracker.step`) and the bias update runs in `on_step_end`, i.e. once per optimizer step, after the
gradients synchronised (Accelerate's sync_gradients).

Logged keys (averaged over the optimizer steps since the previous log): `moe/maxvio` (mean over layers of the batch
MaxVio), `moe/maxvio_global` (the run's accumulated loads), and per MoE layer `moe/layer{i}/maxvio`,
`moe/layer{i}/maxvio_global`, `moe/layer{i}/load_min` (least-used expert's load / mean load); with
`log_expert_load=True` also `moe/layer{i}/load_e{j}` (expert j's share of the layer's tokens x E: 1.0 is balanced).
Layer ids are decoder-layer indices; MTP layers continue after the main ones, as in the official checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from .balancing import ExpertLoadTracker, moe_layers


class MoEBalanceCallback(TrainerCallback):
    """Aux-loss-free bias update (b_i += gamma * sign(mean load - load_i)) per optimizer step, plus MoE logging.

    `update_biases=False` keeps every router bias exactly as it is (the loads are still logged). The paper uses
    gamma = 1e-3 for most of pretraining; a smaller value suits short fine-tuning runs on an already balanced model.
    """

    def __init__(self, gamma: float = 1e-3, update_biases: bool = True, log_expert_load: bool = False):
        self.gamma = gamma
        self.update_biases = update_biases
        self.log_expert_load = log_expert_load
        self.tracker: ExpertLoadTracker | None = None
        self.layer_ids: list[int] = []
        self._handles: list = []
        self._pending: torch.Tensor | None = None
        self._model: nn.Module | None = None
        self._reset_window()

    @classmethod
    def attach(cls, trainer, **kwargs) -> MoEBalanceCallback:
        """Add a callback to `trainer`, ahead of the reporting callbacks so that they log its keys too."""
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    # ------------------------------------------------------------------------------------------------ load hooks
    def register(self, model: nn.Module) -> None:
        """Hook `model` (plain, PEFT- or DDP-wrapped); idempotent."""
        from modeling_deepseek_v3.modeling_dsv3 import DSV3DecoderLayer, DSV3ForCausalLM, DSV3Model

        if self._model is model:
            return
        self.remove()
        layers = moe_layers(model)
        if not layers:
            raise ValueError("MoEBalanceCallback: the model has no DSV3 MoE layer")
        self.tracker = ExpertLoadTracker(len(layers), layers[0].gate.n_routed_experts)
        moe_ids = {id(m) for m in layers}
        self.layer_ids = [
            m.layer_idx for m in model.modules() if isinstance(m, DSV3DecoderLayer) and id(m.mlp) in moe_ids
        ]
        for module in model.modules():
            if isinstance(module, DSV3ForCausalLM):
                self._handles.append(module.register_forward_hook(self._on_causal_lm_output))
            elif isinstance(module, DSV3Model):
                self._handles.append(module.register_forward_hook(self._on_backbone_output))
        self._model = model

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._model, self._pending = [], None, None

    @staticmethod
    def _counts(module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled()

    def _on_backbone_output(self, module, args, output) -> None:
        if self._counts(module):
            self._pending = getattr(output, "expert_load", None)

    def _on_causal_lm_output(self, module, args, output) -> None:
        if not self._counts(module):
            return
        loads = getattr(output, "expert_load", None)
        self.tracker.add(loads if loads is not None else self._pending)
        self._pending = None

    # ------------------------------------------------------------------------------------------ trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.register(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        gamma = self.gamma if self.update_biases else 0.0
        loads_LE, vio_L = self.tracker.step(model, gamma)  # gamma 0: loads summed over ranks, biases untouched
        self._vio_sum_L = vio_L if self._vio_sum_L is None else self._vio_sum_L + vio_L
        self._loads_LE = loads_LE if self._loads_LE is None else self._loads_LE + loads_LE
        self._steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._steps or any(k.startswith("eval_") for k in logs):
            return
        metrics = self.metrics()
        logs.update(metrics)
        # Trainer.log appended a copy of `logs` to the history before the callbacks ran: keep the two in step.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        self._reset_window()

    def on_train_end(self, args, state, control, **kwargs):
        self.remove()

    # ---------------------------------------------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, float]:
        """MoE metrics over the optimizer steps since the last log (see the module docstring for the keys)."""
        vio_L = self._vio_sum_L / self._steps
        global_L = self.tracker.global_max_violation()
        loads_LE = self._loads_LE.double()
        share_LE = loads_LE / loads_LE.mean(-1, keepdim=True).clamp_min(1e-12)  # 1.0 = exactly the mean load
        active_L = loads_LE.sum(-1) > 0
        out = {"moe/maxvio": vio_L[active_L].mean().item(), "moe/maxvio_global": global_L[active_L].mean().item()}
        for row, layer in enumerate(self.layer_ids):
            if not active_L[row]:
                continue  # a layer that saw no tokens (MTP under TRL's fused log-prob path) has nothing to report
            out[f"moe/layer{layer}/maxvio"] = vio_L[row].item()
            out[f"moe/layer{layer}/maxvio_global"] = global_L[row].item()
            out[f"moe/layer{layer}/load_min"] = share_LE[row].min().item()
            if self.log_expert_load:
                out.update({f"moe/layer{layer}/load_e{e}": v for e, v in enumerate(share_LE[row].tolist())})
        return out

    def _reset_window(self) -> None:
        self._vio_sum_L: torch.Tensor | None = None
        self._loads_LE: torch.Tensor | None = None
        self._steps = 0


__all__ = ["MoEBalanceCallback"]
