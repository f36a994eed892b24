"""A sequence classifier around torch.nn.TransformerEncoderLayer (LayerNorm, GELU, multi-head
attention, dropout off): input projection, encoder layers, mean pooling, linear head."""

from torch import nn


class TransformerClassifier(nn.Module):
    def __init__(self, d_in=16, d_model=32, heads=4, classes=5, layers=1, ffn=64):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=ffn, dropout=0.0, activation="gelu",
                                       batch_first=True)
            for _ in range(layers)
        )
        self.head = nn.Linear(d_model, classes)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))
