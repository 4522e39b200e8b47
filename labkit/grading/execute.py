"""GuardedExecute: nbgrader's Execute preprocessor, hardened for grading a whole class.

nbgrader's Execute already interrupts a cell that runs past its time limit and records the
timeout as an error in that cell. Two things still stop a notebook cold, and the grading with it:

- the kernel dies (a crash, ``os._exit``, the out-of-memory killer): nbclient raises
  DeadKernelError and nbgrader gives up on the whole submission;
- the kernel ignores the interrupt (the cell catches KeyboardInterrupt or masks SIGINT): nbclient
  raises CellTimeoutError and nbgrader gives up on the whole submission.

Here either one fails only the cell it happened in: that cell gets an error output, the kernel is
replaced by a fresh one, the cells before it that ran cleanly are run again (silently, to rebuild
the state later cells need), and the notebook goes on. After ``max_kernel_restarts`` restarts the
cells left are not run: each gets an error output, so a test cell that never ran scores zero
(an empty output would score full points: nbgrader #427).

Enabled in ``assignments/nbgrader_config.py`` through ``Autograde.autograde_preprocessors``.
"""

from jupyter_core.utils import run_sync
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat.v4 import new_output
from nbgrader.preprocessors import Execute
from traitlets import Bool, Integer

# The ename of the error output each event leaves in a cell; the score table reads them back.
KERNEL_DIED = "DeadKernelError"
KERNEL_STUCK = "CellTimeoutError"
NOT_RUN = "CellNotRun"


class GuardedExecute(Execute):
    """Execute that survives a dead or stuck kernel and never leaves a test cell unrun."""

    max_kernel_restarts = Integer(
        3, help="Kernel restarts allowed in one notebook before the cells left are failed unrun."
    ).tag(config=True)

    # A print can reach the notebook as several stream outputs (the kernel flushes on a timer,
    # so a busy machine splits one line in two): each cell's stdout and stderr become one output
    # each, so that a graded notebook and its feedback read the same however loaded the grader
    # was. A default of the class, as c.Execute.coalesce_streams in nbgrader_config.py did not
    # reach autograding.
    coalesce_streams = Bool(True, help="Merge each cell's stream outputs of one name into one.").tag(config=True)

    def preprocess(self, nb, resources=None, km=None):
        self._restarts = 0
        self._kernel_lost = False
        return super().preprocess(nb, resources, km)

    def preprocess_cell(self, cell, resources, index):
        if self._kernel_lost:
            if cell.cell_type == "code" and cell.source.strip():
                _fail(cell, NOT_RUN, "not run: the kernel was lost too many times in this notebook")
            return cell, resources
        try:
            return super().preprocess_cell(cell, resources, index)
        except DeadKernelError:
            _fail(cell, KERNEL_DIED, "the kernel died while this cell ran "
                                     "(a crash, os._exit, or running out of memory)")
        except CellTimeoutError:
            _fail(cell, KERNEL_STUCK, "this cell ran past its time limit "
                                      "and did not stop when interrupted")
        self._restart_kernel(replay=self.nb.cells[:index])
        return cell, resources

    def _restart_kernel(self, replay):
        """Replace the kernel and rerun, silently, the cells in ``replay`` that ran cleanly."""
        if self._restarts >= self.max_kernel_restarts:
            self._kernel_lost = True
            return
        self._restarts += 1
        self.log.warning("Restarting the kernel (%d of at most %d) and rerunning the cells "
                         "before this one", self._restarts, self.max_kernel_restarts)
        run_sync(self.km.shutdown_kernel)(now=True)
        self._cleanup_kernel()
        self.km = self.create_kernel_manager()
        self.start_new_kernel()
        self.start_new_kernel_client()
        try:
            for cell in replay:
                if self._ran_cleanly(cell):
                    self.wait_for_reply(self.kc.execute(cell.source, silent=True), cell)
        except DeadKernelError:
            self._kernel_lost = True

    def _ran_cleanly(self, cell):
        return (cell.cell_type == "code" and cell.source.strip()
                and self.skip_cells_with_tag not in cell.metadata.get("tags", [])
                and not any(output.output_type == "error" for output in cell.outputs))


def _fail(cell, ename, evalue):
    cell.outputs.append(new_output(
        "error", ename=ename, evalue=evalue, traceback=[f"\x1b[0;31m{ename}\x1b[0m: {evalue}"]
    ))
