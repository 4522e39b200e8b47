"""The computations behind the Voila dashboards of ``notebooks/dashboards/``.

One module per dashboard; each has the functions that compute and draw (tested without a
browser) and a ``...Dashboard`` class that lays the controls and pictures out, so that a
notebook cell is two lines. ``DASHBOARDS`` lists them for the index page.
"""

DASHBOARDS = (
    ("training.ipynb", "Distributed training, live",
     "choose sync mode, compression and workers, press Start and watch a real run learn"),
    ("collectives.ipynb", "Collectives",
     "ring, tree, recursive doubling and parameter server step by step; the α–β model fitted here; "
     "pack or spread, PCIe or NVLink"),
    ("compression.ipynb", "Gradient compression",
     "every compressor's error against the bytes it sends, on a real gradient, with and without error feedback"),
    ("scaling.ipynb", "Scaling",
     "strong and weak scaling efficiency over your saved runs, and the missing runs made on request"),
    ("parallelism.ipynb", "Parallelism",
     "the pipeline's timeline and bubble as stages and micro-batches change; memory per rank for each parallelism"),
    ("search.ipynb", "Architecture search",
     "ProxylessNAS: latency and accuracy of the derived network as the latency weight λ2 changes"),
)


def index_markdown() -> str:
    """The index page's list: a link and one line per dashboard."""
    return "\n".join(f"- [{title}]({name}): {line}" for name, title, line in DASHBOARDS)
