"""The EMA of the weights (timm ModelEmaV3, owned by ImageClassifier): an average that is never
trained, so DDP does not wait for its gradients, yet saved and restored with the module as ``ema.*``.
Under DDP: tests/test_ddp_run.py."""
from hydra.utils import instantiate

from conftest import FAST, make_cfg


def test_ema_copy_holds_no_trainable_parameters_and_is_in_the_state_dict(tmp_path):
    module = instantiate(make_cfg(tmp_path, [*FAST, "module.ema_decay=0.9"]).module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {f"net.{n}" for n, _ in module.net.named_parameters()}
    assert {f"ema.module.{k}" for k in module.net.state_dict()} <= set(module.state_dict())
