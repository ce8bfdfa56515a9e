"""A user's BatchNorm CNN on scikit-learn's digits, with its own SGD and a OneCycle schedule."""
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(x + self.b2(self.c2(y)))


class OneCycleCNN:
    name = "onecycle-cnn"

    def __init__(self, total_steps: int = 2000) -> None:
        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target)
        self.train = TensorDataset(x[:1500], y[:1500])
        self.eval = TensorDataset(x[1500:], y[1500:])
        self.total_steps = total_steps

    def build_model(self):
        return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
                             nn.ReLU(), Block(32), Block(32), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(32, 10))

    def train_data(self):
        return self.train

    def eval_data(self):
        return self.eval

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def scheduler(self, optimizer):
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2,
                                                   total_steps=self.total_steps)

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def evaluate(self, model, loader):
        right = total = 0
        for x, y in loader:
            right += (model(x).argmax(1) == y).sum().item()
            total += len(y)
        return {"accuracy": right / total}
