"""A small CNN trained on scikit-learn's bundled digits (no download), for the W8A8 network tests
(tests/methods/test_w8a8_cnn.py, tests/formats/test_onnx.py) and benchmarks/int8_cnn.py."""
import torch


def trained_cnn() -> tuple[torch.nn.Sequential, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp32 model in eval mode, train images, test images, test labels): two Conv-BN-ReLU, a max
    pool and a linear layer, 15 epochs of Adam on 1400 of the 1797 8 x 8 digits (~1 s); the rest test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        for i in torch.randperm(1400).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    return model.eval(), x[:1400], x[1400:], y[1400:]
