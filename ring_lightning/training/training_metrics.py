"""What LongDocumentLM logs about the run's speed and memory (a mixin of module.py).

Throughput, the FLOPs of the work the attention really does (the batch's allowed pairs,
counted before sharding: ``flops.batch_attention_pairs``), MFU, the ring's timings and every
rank's peak memory. Kept apart from the training logic: module.py says what is trained,
this file what is measured. State (``_tput``, ``_tokens_seen``, ...) is set in
``LongDocumentLM.__init__``.
"""

from __future__ import annotations

import math
import resource
import time
from typing import Any, Dict

import torch

from ring_lightning.models.flops import PEAK_BF16_FLOPS, attention_pairs


class TrainingMetrics:
    """perf/* and ring/* logging for a LightningModule with ``self.model`` (LongDocTransformer)."""

    def attention_pairs(self, batch: Dict[str, torch.Tensor]) -> float:
        """Allowed (query, key) pairs of one layer's attention on a WHOLE (unsharded) batch.

        Every mask the attention applies is counted (``ring_lightning.models.flops.batch_attention_pairs``):
        the dilated segments, the block-sparse block mask, a token grid's window, and the
        batch's packed documents when ``document_mask`` is on. Every layer is assumed to use
        ``attention`` (a ``build_attention`` that differs per layer is not seen here).
        """
        from ring_lightning.models.flops import batch_attention_pairs

        input_ids = batch["input_ids"]
        B, N = input_ids.shape[0], input_ids.shape[1]
        cfg, pattern = self.attention_config, {}
        if self.attention_variant == "block_sparse":
            from ring_lightning.attention.masks import block_mask_for

            pattern = dict(block_size=cfg.block_size, block_mask=block_mask_for(
                N, cfg.block_size, cfg.sparse_pattern, cfg.sparsity_ratio, cfg.sparse_seed))
        if cfg.grid_shape is not None:
            pattern.update(grid_shape=cfg.grid_shape, grid_window=cfg.grid_window)
        documents = self.document_ids(batch)
        return batch_attention_pairs(N, self.model.config.n_heads, causal=self.is_causal, batch_size=B,
                                     segment_lengths=cfg.segment_lengths, dilation_rates=cfg.dilation_rates,
                                     document_ids=documents if isinstance(documents, torch.Tensor) else None,
                                     **pattern)

    def train_flops(self, batch_size: int, seq_len: int, pairs: float) -> float:
        """Model FLOPs (forward + backward, PaLM's count: no recomputation) of a batch of
        ``batch_size`` whole sequences whose attention allows ``pairs`` pairs per layer: what
        ``perf/tflops_per_gpu`` and ``perf/mfu`` count (divided by the sequence-parallel size)."""
        dense = attention_pairs(seq_len, self.model.config.n_heads, causal=self.is_causal)
        fraction = pairs / (batch_size * dense)
        return batch_size * seq_len * self.model.flops_per_token(seq_len, causal=self.is_causal,
                                                                 attention_fraction=fraction)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The scheduler steps right after the optimizer, before on_train_batch_end: the rate
        # this step's optimizer uses is the one it holds now.
        if self._trainer is not None and self.trainer.optimizers:
            self._lr_used = float(self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, outputs: Any, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        trainer, now = self.trainer, time.perf_counter()
        world, sp = trainer.world_size, int(getattr(trainer.strategy, "sp_size", 1))
        input_ids = batch["input_ids"]
        B, N = input_ids.shape[0], input_ids.shape[1] * sp  # this rank's shard -> the whole sequence
        # Every rank holds different tokens (other samples, or other shards of one), so the
        # global count is the local one times the world size: a sequence group counts once.
        self._tokens_seen += input_ids.numel() * world
        pairs, self._batch_pairs = self._batch_pairs, None
        if pairs is None and sp == 1:  # the counting hook did not run (overridden): the batch is whole
            pairs = self.attention_pairs(batch)
        # A GPU does 1/sp of its sequence group's batch (rank 0's group is what is logged); a
        # step whose work is unknown makes every later window unknown (nan), never a guess.
        self._flops_seen += self.train_flops(B, N, pairs) / sp if pairs is not None else float("nan")
        dense = B * attention_pairs(N, self.model.config.n_heads, causal=self.is_causal)
        self._dense_flops_seen += self.train_flops(B, N, dense) / sp
        self._tput.append((now, self._tokens_seen, self._flops_seen, self._dense_flops_seen))
        if self._lr_used is not None:
            self.log("lr", self._lr_used)
        if len(self._tput) >= 2:
            (t0, n0, f0, d0), (t1, n1, f1, d1) = self._tput[0], self._tput[-1]
            elapsed = max(t1 - t0, 1e-9)
            self.log("perf/tokens_per_s", (n1 - n0) / elapsed, prog_bar=True)
            per_gpu = (f1 - f0) / elapsed
            if self.device.type == "cuda" and math.isfinite(per_gpu):
                self.log("perf/tflops_per_gpu", per_gpu / 1e12)
                self.log("perf/dense_equivalent_tflops_per_gpu", (d1 - d0) / elapsed / 1e12)
                name = torch.cuda.get_device_name(self.device)
                peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
                if peak is not None:
                    self.log("perf/mfu", per_gpu / peak)
        ratio = getattr(trainer.strategy, "compression_ratio", None)
        if isinstance(ratio, (int, float)):
            self.log("ring/compression_ratio", float(ratio))
        # Reading CUDA event timings and gathering memory waits for the device: only on
        # logging steps, so the other steps queue work without a host synchronisation.
        if batch_idx % max(1, trainer.log_every_n_steps) == 0:
            self._log_ring_stats()
            self._log_peak_memory()

    def _log_ring_stats(self) -> None:
        if not self._ring_modules:
            return
        stats = self._ring_modules[0].get_profiling_stats()
        for key, name in (("total_time_ms", "total_ms"), ("compute_time_ms", "compute_ms"), ("comm_time_ms", "comm_ms"),
                          ("comm_volume_mb", "comm_volume_mb"), ("all_to_all_volume_mb", "all_to_all_volume_mb")):
            if isinstance(stats.get(key), (int, float)):
                self.log(f"ring/{name}", float(stats[key]))

    def _log_peak_memory(self) -> None:
        """Peak memory of every rank (a collective: all ranks call it on the same batch)."""
        if self.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
        per_rank = self.all_gather(torch.tensor(float(peak_mb), device=self.device)).reshape(-1)
        self.log("perf/peak_memory_mb", per_rank.max())
        if per_rank.numel() > 1:
            for rank, value in enumerate(per_rank.tolist()):
                self.log(f"perf/peak_memory_mb_rank{rank}", value)
        if self.device.type == "cuda":  # host memory too: offloaded activations or model state live there
            host_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.log("perf/host_peak_memory_mb", self.all_gather(torch.tensor(host_mb, device=self.device)).max())
