"""Your own LightningModule under RingStrategy: `python examples/own_module.py` (README: "Your own
LightningModule"). Through train.py: `python train.py module='{_target_: own_module.OwnLM}'` with
examples/ on PYTHONPATH (the README says how).

A small causal LM written from scratch, not LongDocumentLM: token embeddings plus learned
positions read at the batch's GLOBAL ``position_ids``, one attention block whose core is
``create_ring_attention`` (exact over the whole sequence group), a vocabulary head, and the
plain per-token mean cross-entropy. Under ``RingStrategy(sequence_parallel_size=2)`` each
rank holds half of every sample; the strategy makes the gradient the one-device gradient and
logs the exact loss as ``train/group_loss``. tests/distributed/test_user_module.py trains this
module under sp=2 and checks every step's loss and gradients against sp=1.

Letters: B batch, T this rank's tokens (the sequence / sp), H heads, D head dim, E, V.
"""

import os

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ring_lightning import LongDocumentDataModule, RingStrategy
from ring_lightning.attention import create_ring_attention
from ring_lightning.training.console import progress_bar, quiet_third_party


class OwnLM(L.LightningModule):
    """One attention block over the whole sequence; ``max_len`` >= the data's seq_len."""

    is_causal = True  # read by RingStrategy: the zigzag layout balances causal work

    def __init__(self, vocab_size: int = 256, embed_dim: int = 64, num_heads: int = 4, max_len: int = 4096,
                 lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tok, self.pos = nn.Embedding(vocab_size, embed_dim), nn.Embedding(max_len, embed_dim)
        self.norm, self.qkv = nn.LayerNorm(embed_dim), nn.Linear(embed_dim, 3 * embed_dim)
        self.attn = create_ring_attention("standard")  # a ring over the sequence group; plain attention alone
        self.out, self.head = nn.Linear(embed_dim, embed_dim), nn.Linear(embed_dim, vocab_size)

    def forward(self, input_ids, position_ids, document_ids=None):
        B, T = input_ids.shape
        x = self.tok(input_ids) + self.pos(position_ids)  # (B, T, E): positions are global, not arange(T)
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.hparams.num_heads, -1).unbind(2)  # (B, T, H, D) each
        a = self.attn(q, k, v, is_causal=True, already_split=True, document_ids=document_ids)  # (B, T, H, D)
        return self.head(x + self.out(a.flatten(2)))  # (B, T, V)

    def loss(self, batch):
        """Mean next-token cross-entropy of this rank's tokens; labels arrive aligned (labels[t] is
        the target of input_ids[t]), so there is no shift here."""
        logits = self(batch["input_ids"], batch["position_ids"], batch.get("document_ids"))
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss)  # this rank's shard; the strategy logs the exact train/group_loss
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


if __name__ == "__main__":
    quiet_third_party()
    data = LongDocumentDataModule(source="stdlib", seq_len=512, batch_size=2)
    trainer = L.Trainer(strategy=RingStrategy(sequence_parallel_size=2), devices=2,  # 2 GPUs, else 2 CPU procs
                        max_steps=int(os.environ.get("MAX_STEPS", 20)), logger=False, callbacks=[progress_bar()],
                        default_root_dir="outputs/own_module")
    trainer.fit(OwnLM(vocab_size=data.vocab_size, max_len=512), datamodule=data)
    print(f"train/group_loss {float(trainer.callback_metrics['train/group_loss']):.4f}")
