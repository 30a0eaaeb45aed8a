"""The compiler passes, one module each, and the pipelines that order them.

A pipeline is a literal list; ``run_pipeline`` runs it, checks every pass's postcondition and
records the history that ``ratebp_compile.show`` prints. See README.md in this folder for the
invariants that hold between passes.
"""
from .build_rate_graph import build_rate_graph
from .build_spike_graph import build_spike_graph
from .channels_last import channels_last
from .classify_ops import classify_ops
from .compact_spikes import compact_spikes
from .fold_time import fold_time
from .fuse_lif import fuse_lif
from .infer_time_layout import infer_time_layout
from .infra import PassRecord, PassResult, run_pipeline
from .normalize_neurons import normalize_neurons
from .stream_time import stream_time
from .sync_batchnorm import sync_batchnorm
from .unstride_pointwise_convs import unstride_pointwise_convs

__all__ = ["PIPELINE", "BPTT_PIPELINE", "PassResult", "PassRecord", "run_pipeline", "normalize_neurons",
           "fold_time", "sync_batchnorm", "infer_time_layout", "classify_ops", "build_spike_graph", "build_rate_graph", "fuse_lif",
           "unstride_pointwise_convs", "stream_time", "compact_spikes", "channels_last"]

# Rate-based training step: captured graph -> program(spike graph, rate graph).
PIPELINE = [
    normalize_neurons,     # neuron module calls -> one NeuronSpec node each
    fold_time,             # single-step loops (stateful cells, unrolled) -> the multi-step form
    sync_batchnorm,        # BatchNorms synchronised over a process group -> one sync_batch_norm node each
    infer_time_layout,     # meta["ratebp.time"]: static / time at axis k / merged T·B at axis k; T
    classify_ops,          # meta["ratebp.class"]: neuron / batchnorm / exact / approximate / refused
    build_spike_graph,     # program: exact no-grad forward emitting spikes, r, e, BN statistics
    build_rate_graph,      # + length-1 graph with autograd; outputs route gradients into it
    unstride_pointwise_convs,  # CPU, rate graph: strided 1×1 convolutions read a strided slice with stride 1
    fuse_lif,              # spike-graph neurons -> fused Triton kernels where supported
    stream_time,           # spike graph -> stages run over chunks of time, when over the memory budget
    compact_spikes,        # unstreamed: spikes read again after other layers kept in 1 byte meanwhile
    channels_last,         # CPU: 2-D convolutions and the neurons between them on NHWC memory, streamed or not
]

# Plain BPTT through the same capture, for side-by-side comparison.
BPTT_PIPELINE = [
    normalize_neurons,     # neuron module calls -> one NeuronSpec node each (BPTT forward)
    fold_time,             # single-step loops (stateful cells, unrolled) -> the multi-step form
    sync_batchnorm,        # BatchNorms synchronised over a process group -> BatchNorm over every rank's batch
    fuse_lif,              # neurons -> fused BPTT kernels (forward + reverse-time backward) where supported
    unstride_pointwise_convs,  # CPU: strided 1×1 convolutions read a strided slice with stride 1
]

