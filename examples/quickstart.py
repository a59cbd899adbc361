"""ring_lightning as a plugin: `python examples/quickstart.py` (the README's 15 lines)."""
import os

import lightning as L

from ring_lightning import LongDocumentDataModule, LongDocumentLM, RingStrategy
from ring_lightning.training.console import progress_bar, quiet_third_party

quiet_third_party()  # no third-party deprecations or Lightning tips; progress_bar: plain lines in a log
module = LongDocumentLM(model={"preset": "tiny"}, lr=1e-3, attention={
    "variant": "standard", "segment_lengths": [128, 512], "dilation_rates": [1, 2]})
data = LongDocumentDataModule(source="stdlib", seq_len=512, batch_size=4)  # or source="files", paths=...
trainer = L.Trainer(strategy=RingStrategy(sequence_parallel_size=2), devices=2,  # 2 GPUs, else 2 CPU procs
                    max_steps=int(os.environ.get("MAX_STEPS", 50)), logger=False, callbacks=[progress_bar()],
                    default_root_dir="outputs/quickstart")  # its checkpoints go there
trainer.fit(module, datamodule=data)  # each sample is split over the 2 ranks along the sequence
