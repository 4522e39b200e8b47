"""The collectives dashboard: allreduce algorithms step by step, the α–β model, topologies.

- **Step by step.** :func:`record_schedule` runs labkit's own allreduces
  (:mod:`labkit.comm.collectives`: ring, tree, recursive doubling, parameter server) on N
  ranks that are threads of this process, over :class:`RecordingCommunicator`, which
  hands messages over in memory and writes each one down: who sent what to whom, and at
  which step. Rank r starts with the value 2**r everywhere, so the number in a message
  says whose contributions it carries. A message's step is the first at which it can
  go: after the step at which the sender received the contributions it carries, after
  the sender's previous send and after the receiver's previous receive (a rank sends one
  message and receives one message per step: full duplex, the textbook count of
  :mod:`labkit.comm.costmodel`).
- **The α–β model on this machine.** :func:`measure` starts N real ranks (gloo) through
  ``labkit bench allreduce``'s launcher, fits α and β on a ping-pong and times every
  algorithm at a few sizes; the result is kept, so the next visit shows it at once.
- **Topologies.** :func:`topology_time` plays a recorded schedule on a modelled cluster:
  nodes of G GPUs joined inside a node by PCIe or NVLink and across nodes by a network;
  ranks placed *pack* (fill a node first) or *spread* (round robin over the nodes). A
  step lasts as long as its slowest message; the messages that leave one node in the
  same step share its network link.
"""

from __future__ import annotations

import threading
import time

import torch

from ..comm.base import Communicator
from ..comm.collectives import ALLREDUCE_ALGORITHMS
from ..comm.costmodel import critical_path, predict
from .common import (
    STYLE,
    WIDE,
    figure,
    legend_outside,
    picture,
    png,
    read_json,
    results_dir,
    status_line,
    write_json,
)

ALGORITHMS = tuple(ALLREDUCE_ALGORITHMS)  # ring, tree, recursive_doubling, parameter_server
LABELS = {"ring": "ring", "tree": "tree", "recursive_doubling": "recursive doubling",
          "parameter_server": "parameter server"}
BENCH_NAMES = {"ring": "labkit-ring", "tree": "labkit-tree", "recursive_doubling": "labkit-recursive-doubling",
               "parameter_server": "labkit-ps"}
MEASURE_SIZES = (4 << 10, 64 << 10, 1 << 20)
MEASURE_ITERS = 5

# Links of the modelled cluster: (alpha seconds, bytes per second, one direction).
# PCIe 4.0 x16 about 25 GB/s; NVLink 3 (A100) 300 GB/s per direction; an HDR InfiniBand
# port 200 Gb/s = 25 GB/s. Latencies are the usual orders of magnitude.
LINKS = {"PCIe": (5e-6, 25e9), "NVLink": (2e-6, 300e9)}
NETWORK = (5e-6, 25e9)


class ScheduleError(RuntimeError):
    """A recorded collective did not finish (a rank waited for a message that never came)."""


# --- recording the real algorithms ---------------------------------------------------------------
class _World:
    """What the N thread-ranks share: one mailbox per receiver, the record, the clocks."""

    def __init__(self, n: int, timeout: float):
        self.n, self.timeout = n, timeout
        self.cond = threading.Condition()
        self.mail: list[list[dict]] = [[] for _ in range(n)]
        self.messages: list[dict] = []
        self.last_send = [0] * n
        self.last_recv = [0] * n
        self.acquired: list[dict] = [{} for _ in range(n)]  # rank -> {(chunk, contributor): step}
        self.bases: list[torch.Tensor | None] = [None] * n
        self.chunk_len = 1
        self.barrier = threading.Barrier(n)


class RecordingCommunicator(Communicator):
    """One thread-rank of :func:`record_schedule`: blocking sends handed over in memory."""

    backend = "recording"

    def __init__(self, world: _World, rank: int):
        super().__init__(rank, world.n, world.timeout)
        self.world = world

    def _chunks_of(self, tensor: torch.Tensor) -> list[int]:
        base = self.world.bases[self.rank]
        size = tensor.element_size()
        offset = (tensor.data_ptr() - base.data_ptr()) // size
        if not 0 <= offset < base.numel():
            return []  # not a piece of this rank's buffer
        first = offset // self.world.chunk_len
        last = (offset + tensor.numel() - 1) // self.world.chunk_len
        return list(range(first, last + 1))

    def _send(self, tensor, dst, tag):
        world, payload = self.world, tensor.detach().clone()
        carried = int(payload.reshape(-1)[0].item()) if payload.numel() else 0
        chunks = self._chunks_of(tensor)
        contributors = [r for r in range(world.n) if carried >> r & 1]
        with world.cond:
            acquired = world.acquired[self.rank]
            ready = max([acquired.get((c, r), 0) for c in chunks for r in contributors if r != self.rank],
                        default=0)
            message = {"src": self.rank, "dst": dst, "tag": tag, "payload": payload, "chunks": chunks,
                       "carries": contributors, "ready": ready, "step": None}
            world.mail[dst].append(message)
            world.cond.notify_all()
            if not world.cond.wait_for(lambda: message["step"] is not None, timeout=world.timeout):
                raise ScheduleError(f"rank {self.rank}: nobody received its message to rank {dst}")
            world.last_send[self.rank] = message["step"]

    def _recv(self, tensor, src, tag):
        world = self.world

        def match():
            for m in world.mail[self.rank]:
                if m["tag"] == tag and (src is None or m["src"] == src):
                    return m
            return None

        with world.cond:
            if not world.cond.wait_for(lambda: match() is not None, timeout=world.timeout):
                raise ScheduleError(f"rank {self.rank}: no message from {src} arrived")
            message = match()
            world.mail[self.rank].remove(message)
            step = 1 + max(message["ready"], world.last_send[message["src"]], world.last_recv[self.rank])
            world.last_recv[self.rank] = step
            for c in message["chunks"]:
                for r in message["carries"]:
                    world.acquired[self.rank].setdefault((c, r), step)
            tensor.copy_(message["payload"].view(tensor.shape))
            message["step"] = step
            world.messages.append({k: message[k] for k in ("src", "dst", "chunks", "carries", "step")}
                                  | {"numel": message["payload"].numel()})
            world.cond.notify_all()
            return message["src"]

    def _barrier(self):
        self.world.barrier.wait(self.world.timeout)


def record_schedule(algorithm: str, n: int, elements: int | None = None, timeout: float = 20.0) -> dict:
    """Run labkit's ``algorithm`` allreduce on ``n`` thread-ranks and return its messages.

    ``{"algorithm", "n", "steps", "messages": [{"step", "src", "dst", "chunks", "carries",
    "numel"}], "correct"}``: ``chunks`` are the indices (of N) of the sender's buffer that
    the message holds, ``carries`` the ranks whose contributions are summed in it,
    ``correct`` whether every rank ended with the exact sum.
    """
    if algorithm not in ALLREDUCE_ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if not 2 <= n <= 32:
        raise ValueError(f"ranks must be between 2 and 32, got {n}")
    elements = elements or n * 4
    world = _World(n, timeout)
    world.chunk_len = -(-elements // n)
    buffers = [torch.full((elements,), float(2 ** r), dtype=torch.float64) for r in range(n)]
    world.bases = buffers
    errors: list[str] = []

    def rank_main(r):
        try:
            ALLREDUCE_ALGORITHMS[algorithm](RecordingCommunicator(world, r), buffers[r])
        except Exception as e:  # noqa: BLE001 - reported below, with the rank
            errors.append(f"rank {r}: {type(e).__name__}: {e}")
            with world.cond:
                world.cond.notify_all()

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    if errors or any(t.is_alive() for t in threads):
        raise ScheduleError(f"{algorithm} on {n} ranks did not finish: " + ("; ".join(errors) or "timed out"))
    total = float(2 ** n - 1)
    messages = sorted(world.messages, key=lambda m: (m["step"], m["src"], m["dst"]))
    return {"algorithm": algorithm, "n": n, "elements": elements, "messages": messages,
            "steps": max((m["step"] for m in messages), default=0),
            "correct": all(bool((b == total).all()) for b in buffers)}


# --- what each rank holds after each step -------------------------------------------------------
def holdings(schedule: dict, upto: int) -> list[list[set]]:
    """[rank][chunk] -> the set of ranks whose contributions it holds after step ``upto``."""
    n = schedule["n"]
    held = [[{r} for _ in range(n)] for r in range(n)]
    for m in schedule["messages"]:
        if m["step"] > upto:
            break
        for c in m["chunks"]:
            if c < n:
                held[m["dst"]][c] |= set(m["carries"])
    return held


def schedule_png(schedule: dict, step: int) -> bytes:
    """Ranks on a circle; the messages of ``step`` as arrows labelled with their chunks;
    beside each rank, how complete each of its chunks is after the step."""
    import math

    n, fig = schedule["n"], figure(10, 4.6)
    ax, grid = fig.subplots(1, 2, gridspec_kw=dict(left=0.02, right=0.98, bottom=0.12, top=0.86, wspace=0.15,
                                                   width_ratios=(1.1, 1)))
    name = LABELS[schedule["algorithm"]]
    fig.suptitle(f"{name} on {n} ranks: step {step} of {schedule['steps']}")
    pos = [(math.cos(math.pi / 2 - 2 * math.pi * r / n), math.sin(math.pi / 2 - 2 * math.pi * r / n))
           for r in range(n)]
    ax.set(xlim=(-1.4, 1.4), ylim=(-1.35, 1.35), aspect="equal")
    ax.axis("off")
    now = [m for m in schedule["messages"] if m["step"] == step]
    busy = {m["src"] for m in now} | {m["dst"] for m in now}
    for r, (x, y) in enumerate(pos):
        ax.add_patch(_circle((x, y), 0.16, "tab:orange" if r in busy else "lightsteelblue"))
        ax.text(x, y, str(r), ha="center", va="center", fontsize=12, weight="bold")
    for m in now:
        (x0, y0), (x1, y1) = pos[m["src"]], pos[m["dst"]]
        d = math.hypot(x1 - x0, y1 - y0) or 1
        ux, uy = (x1 - x0) / d, (y1 - y0) / d
        ax.annotate("", xy=(x1 - 0.18 * ux, y1 - 0.18 * uy), xytext=(x0 + 0.18 * ux, y0 + 0.18 * uy),
                    arrowprops=dict(arrowstyle="-|>", color="tab:red", lw=1.6,
                                    connectionstyle="arc3,rad=0.12"))
        what = "all" if len(m["chunks"]) >= n else ",".join(map(str, m["chunks"]))
        ax.text((x0 + x1) / 2 - 0.12 * uy, (y0 + y1) / 2 + 0.12 * ux, f"chunk {what}", fontsize=8,
                color="tab:red", ha="center", va="center")
    if not now:
        ax.text(0, -1.28, "step 0: every rank holds only its own data", ha="center", fontsize=9)
    held = holdings(schedule, step)
    grid.imshow([[len(c) / n for c in row] for row in held], vmin=0, vmax=1, cmap="Greens", aspect="auto")
    grid.set(xlabel="chunk", ylabel="rank", title="share of the sum each rank holds, per chunk")
    grid.set_xticks(range(n))
    grid.set_yticks(range(n))
    for r in range(n):
        for c in range(n):
            grid.text(c, r, str(len(held[r][c])), ha="center", va="center", fontsize=8,
                      color="white" if len(held[r][c]) > n / 2 else "black")
    return png(fig)


def _circle(xy, radius, color):
    from matplotlib.patches import Circle

    return Circle(xy, radius, color=color, zorder=2)


# --- the alpha-beta model, measured here ----------------------------------------------------------
def measure_path(n: int):
    return results_dir("collectives") / f"allreduce-n{n}.json"


def measure(n: int, sizes=MEASURE_SIZES, iters: int = MEASURE_ITERS, progress=None) -> dict:
    """Time the four algorithms on ``n`` real gloo ranks of this machine; fit α, β (ping-pong).

    Runs ``labkit bench allreduce``'s ranks (:func:`labkit.bench.allreduce.run_ranks`);
    keeps the result for the next visit and returns it, with the load average.
    """
    import os

    from ..bench import allreduce as bench

    class _Count:
        def update(self, k):
            if progress:
                progress(k)

    names = [BENCH_NAMES[a] for a in ALGORITHMS]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = bench.run_ranks(n, "gloo", names, list(sizes), iters, _Count())
    result.update(load_avg_1m=load, seconds=time.perf_counter() - start, measured_at=time.strftime("%Y-%m-%d %H:%M"))
    write_json(measure_path(n), result)
    return result


def saved_measurement(n: int) -> dict | None:
    data = read_json(measure_path(n))
    ok = isinstance(data, dict) and isinstance(data.get("rows"), list) and "alpha_s" in data
    return data if ok else None


def model_png(n: int, measured: dict | None) -> bytes:
    """Time against message size per algorithm: the α–β model (lines) and the measured times (dots)."""
    fig = figure(10, 3.8)
    ax = fig.subplots(1, 1, gridspec_kw=dict(left=0.08, right=0.72, bottom=0.15, top=0.88))
    ax.set(xscale="log", yscale="log", xlabel="message size (bytes)", ylabel="allreduce time (µs)")
    ax.grid(alpha=0.3, which="both")
    sizes = [2 ** k for k in range(10, 25)]
    if measured is None:
        ax.set_title(f"α–β model on {n} ranks: not measured on this machine yet (press Measure)")
        ax.text(0.5, 0.5, "no measurement yet", transform=ax.transAxes, ha="center", color="gray")
        ax.set_xlim(sizes[0], sizes[-1])
        return png(fig)
    alpha, beta = measured["alpha_s"], measured["beta_s_per_byte"]
    ax.set_title(f"{n} gloo ranks here: α = {alpha * 1e6:.0f} µs, 1/β = {1 / beta / 1e9:.2f} GB/s "
                 f"(load {measured.get('load_avg_1m', float('nan')):.1f})", fontsize=10)
    for i, a in enumerate(ALGORITHMS):
        color = f"C{i}"
        ax.plot(sizes, [predict(a, s, n, alpha, beta, full_duplex=False) * 1e6 for s in sizes], color=color,
                label=f"{LABELS[a]} (model)")
        rows = [r for r in measured["rows"] if r["algorithm"] == BENCH_NAMES[a]]
        ax.plot([r["bytes"] for r in rows], [r["time_us"] for r in rows], "o", color=color, label="measured")
    legend_outside(ax, grid=False)
    return png(fig)


# --- topologies ------------------------------------------------------------------------------------
def placement(n: int, gpus_per_node: int, how: str) -> list[int]:
    """The node of each rank: ``pack`` fills node 0 first, ``spread`` deals the ranks round robin."""
    nodes = -(-n // gpus_per_node)
    if how == "pack":
        return [r // gpus_per_node for r in range(n)]
    if how == "spread":
        return [r % nodes for r in range(n)]
    raise ValueError(f"placement must be pack or spread, got {how!r}")


def topology_time(schedule: dict, nbytes: float, node_of: list[int], link: str) -> float:
    """Seconds for the recorded ``schedule`` to allreduce ``nbytes`` on the modelled cluster."""
    n = schedule["n"]
    intra_alpha, intra_bw = LINKS[link]
    net_alpha, net_bw = NETWORK
    total = 0.0
    for step in range(1, schedule["steps"] + 1):
        now = [m for m in schedule["messages"] if m["step"] == step]
        leaving: dict[int, int] = {}
        for m in now:
            if node_of[m["src"]] != node_of[m["dst"]]:
                leaving[node_of[m["src"]]] = leaving.get(node_of[m["src"]], 0) + 1
        slowest = 0.0
        for m in now:
            size = nbytes * min(len(m["chunks"]), n) / n
            if node_of[m["src"]] == node_of[m["dst"]]:
                t = intra_alpha + size / intra_bw
            else:  # the node's network link is shared by its messages of this step
                t = net_alpha + size * leaving[node_of[m["src"]]] / net_bw
            slowest = max(slowest, t)
        total += slowest
    return total


def topology_png(schedules: dict, nbytes: float, gpus_per_node: int) -> bytes:
    n = next(iter(schedules.values()))["n"]
    fig = figure(10, 3.6)
    ax = fig.subplots(1, 1, gridspec_kw=dict(left=0.08, right=0.78, bottom=0.2, top=0.86))
    cases = [(how, link) for how in ("pack", "spread") for link in LINKS]
    width = 0.8 / len(cases)
    for k, (how, link) in enumerate(cases):
        nodes = placement(n, gpus_per_node, how)
        times = [topology_time(schedules[a], nbytes, nodes, link) * 1e3 for a in ALGORITHMS]
        ax.bar([i + (k - 1.5) * width for i in range(len(ALGORITHMS))], times, width,
               label=f"{how}, {link} in a node", color=f"C{k}")
    ax.set_xticks(range(len(ALGORITHMS)), [LABELS[a] for a in ALGORITHMS])
    nodes = -(-n // gpus_per_node)
    ax.set(ylabel="modelled time (ms)",
           title=f"{nbytes / 2**20:g} MB over {n} GPUs on {nodes} node(s) of {gpus_per_node} "
                 f"(network {NETWORK[1] / 1e9:g} GB/s)")
    legend_outside(ax)
    return png(fig)


# --- the dashboard -----------------------------------------------------------------------------------
class CollectivesDashboard:
    """Controls and pictures; every callback runs on the kernel's thread."""

    def __init__(self, n: int = 4):
        import ipywidgets as w

        self.ranks = w.IntSlider(value=n, min=2, max=8, description="ranks", style=STYLE,
                                 tooltip="N: the number of ranks taking part in the allreduce")
        self.algorithm = w.Dropdown(options=[(LABELS[a], a) for a in ALGORITHMS], value="ring",
                                    description="algorithm", style=STYLE, tooltip="labkit.comm.collectives: which allreduce")
        self.play = w.Play(value=0, min=0, max=1, interval=900, description="play", tooltip="play the steps")
        self.step = w.IntSlider(value=0, min=0, max=1, description="step", style=STYLE, tooltip="the step shown (0: before any)")
        w.jslink((self.play, "value"), (self.step, "value"))
        self.steps_note = w.HTML()
        self.anim = picture("collectives-steps")
        self.measure_button = w.Button(layout=WIDE, description="Measure on this machine", icon="stopwatch",
                                       tooltip="start N gloo ranks here, fit α and β on a ping-pong and time "
                                               "every algorithm at 4 KB, 64 KB and 1 MB (about 10-20 s)")
        self.status = status_line()
        self.model = picture("collectives-model")
        self.size_mb = w.FloatLogSlider(value=64, base=2, min=-4, max=10, step=1, description="MB", style=STYLE,
                                        tooltip="size of the allreduced buffer on the modelled cluster")
        self.gpus = w.Dropdown(options=[2, 4, 8], value=2, description="GPUs/node", style=STYLE,
                               tooltip="GPUs per node of the modelled cluster")
        self.topology = picture("collectives-topology")
        self.schedules: dict[tuple, dict] = {}
        self.ranks.observe(lambda _: self.on_ranks(), "value")
        self.algorithm.observe(lambda _: self.on_algorithm(), "value")
        self.step.observe(lambda _: self.draw_step(), "value")
        self.size_mb.observe(lambda _: self.draw_topology(), "value")
        self.gpus.observe(lambda _: self.draw_topology(), "value")
        self.measure_button.on_click(lambda _: self.on_measure())
        self.on_algorithm()
        self.draw_model()
        self.draw_topology()
        self.widget = w.VBox([
            w.HTML("<h3>One allreduce, step by step</h3>"),
            w.HBox([self.ranks, self.algorithm]), w.HBox([self.play, self.step, self.steps_note]), self.anim,
            w.HTML("<h3>The α–β model, fitted on this machine</h3>"),
            w.HBox([self.measure_button, self.status]), self.model,
            w.HTML("<h3>Pack or spread, PCIe or NVLink: a modelled cluster</h3>"),
            w.HBox([self.size_mb, self.gpus]), self.topology])

    def schedule(self, algorithm: str, n: int) -> dict:
        if (algorithm, n) not in self.schedules:
            self.schedules[algorithm, n] = record_schedule(algorithm, n)
        return self.schedules[algorithm, n]

    def on_ranks(self):
        self.on_algorithm()
        self.draw_model()
        self.draw_topology()

    def on_algorithm(self):
        s = self.schedule(self.algorithm.value, self.ranks.value)
        self.play.max = self.step.max = s["steps"]
        full, _ = critical_path(self.algorithm.value, 1, self.ranks.value, full_duplex=True)
        self.steps_note.value = (f"{s['steps']} steps recorded from labkit's code, {len(s['messages'])} messages; "
                                 f"the cost model counts {full}; sum {'exact' if s['correct'] else 'WRONG'}")
        self.draw_step()

    def draw_step(self):
        s = self.schedule(self.algorithm.value, self.ranks.value)
        self.anim.value = schedule_png(s, min(self.step.value, s["steps"]))

    def draw_model(self):
        self.model.value = model_png(self.ranks.value, saved_measurement(self.ranks.value))

    def draw_topology(self):
        n = self.ranks.value
        schedules = {a: self.schedule(a, n) for a in ALGORITHMS}
        self.topology.value = topology_png(schedules, self.size_mb.value * 2**20, self.gpus.value)

    def on_measure(self):
        self.measure_button.disabled = True
        self.status.value = f"measuring on {self.ranks.value} ranks..."
        try:
            result = measure(self.ranks.value)
            self.status.value = (f"measured in {result['seconds']:.0f} s (load average "
                                 f"{result['load_avg_1m']:.1f} before)")
        except Exception as e:  # noqa: BLE001 - shown in the page in one line
            self.status.value = f"measurement failed: {str(e).splitlines()[0]}"
        finally:
            self.measure_button.disabled = False
        self.draw_model()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
