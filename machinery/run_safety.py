"""Run safety: one training run per folder (`RunLock`), stop signals that end training after
the step in progress (`GracefulStop`, `StopRequested`, `signal_name`), loading workers that
leave those signals to the main process (`ignore_stop_signals`), and the exit hook that ends
the workers an error left behind (`kill_leftover_workers`, registered on import).
"""
import atexit
import contextlib
import datetime
import errno
import multiprocessing
import multiprocessing.util  # noqa: F401 (see kill_leftover_workers)
import os
import signal
import socket

from machinery.files import make_dirs
from pix2pixCC_Options import UserError

try:
    import fcntl  # the run lock; absent on Windows, which runs unlocked
except ImportError:
    fcntl = None


class RunLock:
    """An operating-system lock on a run folder, so two training runs never write into one.

    `flock` is released by the kernel when the holding process ends in any way (SIGKILL
    included), so a killed run leaves no stale lock behind. The file keeps who holds it, for
    the message the second run prints, and is removed when the run ends (the OS lock, not
    the file, says whether a run is going). Systems without fcntl (Windows), and file
    systems without `flock` (NFS without lockd, Lustre mounted without flock), run unlocked,
    the latter with a warning.
    """

    def __init__(self, folder, log=print):
        self.path = os.path.join(folder, 'train.lock')
        self.log = log
        self.fd = None

    def acquire(self):
        if fcntl is None:
            return
        make_dirs(os.path.dirname(self.path))
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    # Not "held by another run": this file system cannot lock at all.
                    self.log(f"warning: cannot lock {self.path} ({error.strerror}): this file "
                             f"system has no flock, so a second training run in this folder "
                             f"would not be detected; run one at a time")
                    break
                holder = os.pread(fd, 4096, 0).decode(errors='replace').strip() or \
                    'a process that has not written its name yet'
                os.close(fd)
                raise UserError(f"another training run is using {os.path.dirname(self.path)} "
                                f"({holder}); wait for it to end or stop it, or choose another "
                                f"--dataset_name") from None
            if self._is_current(fd):
                break
            os.close(fd)  # a run that ended removed the file between our open and our lock
        started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on host {socket.gethostname()}, started "
                      f"{started}\n".encode(), 0)
        self.fd = fd

    def _open(self):
        """The lock file's descriptor, never through a symbolic link: a link (say, from a run
        folder copied with `cp -s`) is replaced by a file of this run's own, and the file it
        points to is left as it is."""
        if os.path.islink(self.path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0),
                           0o644)
        except OSError as error:
            raise UserError(f"cannot create {self.path}: {error.strerror}") from None

    def _is_current(self, fd):
        """Whether `fd` is still the file at the lock's path (not one a finished run removed)."""
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
        except FileNotFoundError:
            return False

    def release(self):
        if self.fd is None:
            return
        # Removed while still locked, so no later run reads this finished run's name in it.
        if self._is_current(self.fd):
            with contextlib.suppress(OSError):
                os.remove(self.path)
        os.close(self.fd)  # closing the file releases the lock
        self.fd = None


class StopRequested(UserError):
    """A stop signal ended the run: exit 128 + signal. `when` says where it stopped (by
    default, before training began, with nothing to save)."""

    def __init__(self, signum, when='before the first training step; nothing was saved'):
        super().__init__(f"stopped by {signal_name(signum)} {when}")
        self.exit_status = 128 + signum


def signal_name(signum):
    return signal.Signals(signum).name


class GracefulStop:
    """SIGTERM, SIGINT and SIGUSR1 end training after the step in progress, not at once.

    Schedulers (SLURM, PBS) send SIGTERM (or a chosen signal such as SIGUSR1) some time before
    they kill a job, and Ctrl-C sends SIGINT: the driver finishes the step, saves a
    checkpoint and exits with 128 + the signal number. Before `defer()` (data checks,
    loading a checkpoint, building the networks) a signal stops at once with StopRequested.
    A SIGINT while a stop is pending raises KeyboardInterrupt and sets `aborted`: a second
    Ctrl-C aborts at once.

    The Test script uses it per file (README "Sharing a model and running it elsewhere"):
    `early` ends the StopRequested line of a signal before `defer()`, `pending` is what the
    line printed at a deferred signal says will happen.
    """

    def __init__(self, early='before the first training step; nothing was saved',
                 pending='stopping after the step in progress and saving a checkpoint'):
        self.early, self.pending = early, pending
        self.signals = [signal.SIGTERM, signal.SIGINT] + \
            ([signal.SIGUSR1] if hasattr(signal, 'SIGUSR1') else [])
        self.signum = None
        self.deferring = False
        self.aborted = False
        self.previous = {}

    def __enter__(self):
        try:
            for signum in self.signals:
                self.previous[signum] = signal.signal(signum, self.handle)
        except ValueError:  # not the main thread (e.g. called from a worker thread)
            self.previous = {}
        return self

    def __exit__(self, exc_type, exc, traceback):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        # A library that catches the StopRequested raised inside it (torch.load turns it into
        # an unpickling error, a reader into "cannot read") must not make a stop look like a
        # bad file: whatever came out, the run was stopped.
        if exc is not None and not self.deferring and self.signum is not None and \
                not isinstance(exc, StopRequested):
            raise StopRequested(self.signum, self.early) from None

    def defer(self):
        """From now on a signal ends the run after the step in progress. A signal that came
        earlier and was swallowed on its way out stops the run now."""
        if self.signum is not None:
            raise StopRequested(self.signum, self.early)
        self.deferring = True

    def handle(self, signum, frame):
        if not self.deferring:
            self.signum = signum
            raise StopRequested(signum, self.early)
        if self.signum is not None:
            if signum == signal.SIGINT:
                self.aborted = True
                raise KeyboardInterrupt
            return
        self.signum = signum
        # os.write, not print: a handler may run while print holds the stream's buffer.
        os.write(2, f"\n{signal_name(signum)} received: {self.pending} (Ctrl-C again aborts "
                    f"at once)\n".encode())


def ignore_stop_signals(worker_id=None):
    """worker_init_fn of DataLoaders: loading workers leave stop signals to the main process
    (Ctrl-C and SLURM's SIGTERM reach the whole process group; a worker that died of them
    would end the run with a DataLoader error instead of a clean stop)."""
    for name in ('SIGINT', 'SIGTERM', 'SIGUSR1'):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def kill_leftover_workers():
    """At exit, end the loading workers an error left behind with SIGKILL: Python's own exit
    handler ends daemonic children with SIGTERM, which they ignore, and would wait forever."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers and hasattr(signal, 'SIGCHLD'):
        # PyTorch's SIGCHLD handler would report the killed workers as a failure.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
        worker.join()


# Registered after multiprocessing's exit handler (multiprocessing.util, imported above,
# registers it), so it runs before it: atexit is last in, first out.
atexit.register(kill_leftover_workers)
