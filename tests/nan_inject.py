"""Test helper, not a test: `pretrain.py` with the audio of chosen training batches replaced by NaN.

    W2V_NAN_AT="RANK:CALL,..." deepspeed ... tests/nan_inject.py <pretrain flags>

CALL counts the batches a rank prepares (1-based). Lets tests reach runs in other processes (the deepspeed
launcher) without a user-facing flag.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.step import PretrainStep  # noqa: E402

BAD = {tuple(int(x) for x in item.split(":")) for item in os.environ.get("W2V_NAN_AT", "").split(",") if item}
_prepare, _calls = PretrainStep.prepare, [0]


def prepare(self, batch):
    _calls[0] += 1
    if (int(os.environ.get("RANK", "0")), _calls[0]) in BAD:
        batch = dict(batch, input_values=batch["input_values"] * float("nan"))
    return _prepare(self, batch)


PretrainStep.prepare = prepare

if __name__ == "__main__":
    import pretrain
    sys.exit(pretrain.main(sys.argv[1:]))
