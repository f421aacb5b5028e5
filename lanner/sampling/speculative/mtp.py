"""Multi-token-prediction heads (`mtp`): DeepSeek-V3's layout (lanner/models/mtp.py), from the
target's own checkpoint when its config has `num_nextn_predict_layers`, or from `model`."""
from __future__ import annotations

from torch import nn

from lanner.errors import ConfigError
from lanner.models.eagle3 import read_config
from lanner.models.loader import init_dummy_weights, iter_checkpoint, load_weights
from lanner.models.mtp import MtpLayer, layer_tensors
from lanner.sampling.speculative import DraftContext, ModelProposer, build_on


class MtpProposer(ModelProposer):
    method = "mtp"
    target_hidden = "final"

    def model_path(self, target_path: str) -> str:
        if self.config.model is None and read_config(target_path).get("num_nextn_predict_layers"):
            return target_path
        return super().model_path(target_path)

    def load(self, ctx: DraftContext) -> nn.Module:
        path = self.model_path(ctx.target_path)
        raw = read_config(path)
        target = ctx.target.whole_spec  # the layer is whole on every tensor-parallel rank
        if not raw.get("num_nextn_predict_layers"):
            raise ConfigError(f"{path!r} has no MTP layer (its config has no num_nextn_predict_layers)")
        if raw.get("hidden_size") != target.hidden_size or raw.get("vocab_size") != target.vocab_size:
            raise ConfigError(f"the MTP layer in {path!r} is not for this target (hidden size or vocabulary differ)")
        layer = build_on(ctx.device, ctx.dtype, lambda: MtpLayer(target, ctx.target))
        if ctx.load_format == "dummy":
            init_dummy_weights(layer, ctx.seed)
        else:
            load_weights(layer, layer_tensors(iter_checkpoint(path), raw["num_hidden_layers"]))
        return layer.eval()
