"""The tensor the GGUF golden blocks were made from: built from integers and exact binary
fractions only, so that it is the same on every machine (no random generator involved)."""
import torch


def golden_input() -> torch.Tensor:
    i = torch.arange(4 * 512, dtype=torch.int64).reshape(4, 512)
    # a deterministic spread of values: (i * 7919 mod 2048 - 1024) / 256, scaled per column
    w = ((i * 7919) % 2048 - 1024).to(torch.float32) / 256
    w = w * (1 + (torch.arange(512) % 17).to(torch.float32)) / 8
    w[1] = 0.0                    # a zero row
    w[2, :256] = 1.5              # a constant super-block
    w[2, 300:340] = -0.0          # a run of negative zeros
    w[3, :32] *= 2.0 ** -20       # tiny values
    w[3, 64:96] *= 64.0           # large values
    return w


def golden_imatrix() -> torch.Tensor:
    """Importance per column (mean squared activations are positive and uneven)."""
    return (((torch.arange(512) * 37) % 101) + 1).to(torch.float32) / 16
