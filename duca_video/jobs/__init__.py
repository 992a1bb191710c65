"""Everything about a job: its plan (`plan`: prompts, names, seeds, batches, shares), each video's identity
(`identity`), the scan of the save folder and the claim of a batch (`scan`, `locks`, `resume`), the records and
the summary (`records`), and writing a generated video (`outputs`)."""

from .identity import VideoIdentity
from .outputs import make_record, write_batch_video, write_outputs
from .plan import MAX_VIDEOS, VideoJob, batch_jobs, data_parallel_share, encoder_text, load_prompts, plan_batches
from .records import RECORD_FIELDS, OutputPaths, RunSummary
from .scan import claim_batch, finish_summary, scan_outputs

__all__ = [
    "MAX_VIDEOS",
    "RECORD_FIELDS",
    "OutputPaths",
    "RunSummary",
    "VideoIdentity",
    "VideoJob",
    "batch_jobs",
    "claim_batch",
    "data_parallel_share",
    "encoder_text",
    "finish_summary",
    "load_prompts",
    "make_record",
    "plan_batches",
    "scan_outputs",
    "write_batch_video",
    "write_outputs",
]
