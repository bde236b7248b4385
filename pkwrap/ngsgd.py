r"""Online natural gradient: Kaldi's ``OnlineNaturalGradient`` in plain torch.

This is the preconditioner of Kaldi's NG-SGD (Povey, Zhang and Khudanpur, "Parallel
training of DNNs with natural gradient and parameter averaging", ICLR workshop 2015),
reimplemented from the description in Kaldi's ``src/nnet3/natural-gradient-online.h``.
Every quantity below keeps the name it has there.

Notation
--------
A minibatch is a matrix :math:`X_t \in \mathbb{R}^{N \times D}` (N rows, each a vector
of dimension D: an input of an affine layer with a ones column appended, or an
output derivative).  ``t`` counts the calls made so far.  ``R`` (1 <= R < D) is the rank.

We keep a running estimate of the uncentred covariance ("Fisher matrix") of the rows,
restricted to a scaled identity plus a rank-R term:

.. math::

   F_t = R_t^T D_t R_t + \rho_t I                                      \quad (F)

with :math:`R_t` (R x D) having orthonormal rows, :math:`D_t` diagonal and positive,
:math:`\rho_t > 0`.

Preconditioning
---------------
The matrix actually inverted is :math:`F_t` smoothed towards the identity in
proportion to its own trace (``alpha`` = 4 in Kaldi):

.. math::

   G_t = F_t + \frac{\alpha}{D}\,\mathrm{tr}(F_t)\, I = R_t^T D_t R_t + \beta_t I,
   \qquad \beta_t = \rho_t (1 + \alpha) + \frac{\alpha}{D}\,\mathrm{tr}(D_t).   \quad (\beta)

By the Woodbury identity, :math:`\beta_t G_t^{-1} = I - R_t^T E_t R_t` with the
diagonal :math:`E_t` of elements

.. math::

   e_{ii} = \frac{1}{\beta_t / d_{ii} + 1}.                                    \quad (E)

Storing :math:`W_t = E_t^{1/2} R_t` instead of :math:`R_t`, the preconditioned
minibatch is two skinny matrix products:

.. math::

   H_t = X_t W_t^T, \qquad \hat X_t = \beta_t X_t G_t^{-1} = X_t - H_t W_t.   \quad (\hat X)

The caller multiplies :math:`\hat X_t` by
:math:`\gamma_t = \sqrt{\mathrm{tr}(X_t X_t^T) / \mathrm{tr}(\hat X_t \hat X_t^T)}`
(returned as ``scale``, 1 when the input is all zero) so that the overall 2-norm is unchanged.

Updating the estimate
---------------------
With :math:`\eta = 1 - \exp(-N / \text{num\_samples\_history})`, capped at 0.9 (or
:math:`1/\text{num\_minibatches\_history}` when that is set), the target is the smoothed
scatter :math:`T_t = \frac{\eta}{N} X_t^T X_t + (1-\eta) F_t`.  One power-method step
on it starts from

.. math::

   Y_t = R_t T_t = \frac{\eta}{N} E_t^{-1/2} J_t + (1-\eta)(D_t + \rho_t I) R_t,
   \qquad J_t = H_t^T X_t.                                                     \quad (Y)

The R x R matrix :math:`Z_t = Y_t Y_t^T` only needs
:math:`K_t = J_t J_t^T` and :math:`L_t = H_t^T H_t` (or :math:`W_t J_t^T` when N > D):

.. math::

   Z_t = \Big(\frac{\eta}{N}\Big)^2 E_t^{-1/2} K_t E_t^{-1/2}
       + \frac{\eta}{N}(1-\eta)\big(E_t^{-1/2} L_t E_t^{-1/2} P_t + P_t E_t^{-1/2} L_t E_t^{-1/2}\big)
       + (1-\eta)^2 P_t^2,                                                    \quad (Z)

with :math:`P_t = D_t + \rho_t I`.  Z is formed in float64 (it scales as the fourth
power of the data), divided by :math:`\max(1, \mathrm{tr} Z_t)`, and decomposed as
:math:`Z_t = U_t C_t U_t^T` with eigenvalues sorted from largest to smallest.
Eigenvalues below :math:`(\rho_t(1-\eta))^2` (the mathematical minimum) are floored.
Then

.. math::

   R_{t+1} = C_t^{-1/2} U_t^T Y_t, \qquad D_{t+1} = C_t^{1/2} - \rho_{t+1} I,   \quad (R_{t+1})

.. math::

   \rho_{t+1} = \frac{1}{D - R}\Big(\frac{\eta}{N}\mathrm{tr}(X_t X_t^T)
     + (1-\eta)(D\rho_t + \mathrm{tr}\,D_t) - \mathrm{tr}\,C_t^{1/2}\Big),    \quad (\rho)

which keeps :math:`\mathrm{tr}\,F_{t+1} = \mathrm{tr}\,T_t`.  Both :math:`\rho_{t+1}` and the
elements of :math:`D_{t+1}` are floored at
:math:`\max(\epsilon, \delta \max_i \sqrt{c_{ii}})` (:math:`\epsilon = 10^{-10}`,
:math:`\delta = 5\cdot 10^{-4}`).  In terms of stored quantities,

.. math::

   W_{t+1} = A_t B_t, \quad
   A_t = \frac{\eta}{N} E_{t+1}^{1/2} C_t^{-1/2} U_t^T E_t^{-1/2}, \quad
   B_t = J_t + \frac{1-\eta}{\eta/N} P_t W_t.                                 \quad (W_{t+1})

Re-orthogonalization: when :math:`c_{00} > 10^6 c_{R-1,R-1}` or any eigenvalue was
floored, :math:`O = E_{t+1}^{-1/2} W_{t+1} W_{t+1}^T E_{t+1}^{-1/2}` should be the unit
matrix; if it is off by more than :math:`10^{-3}` anywhere, with :math:`O = C C^T`
(Cholesky), :math:`W_{t+1} \leftarrow E_{t+1}^{1/2} C^{-1} E_{t+1}^{-1/2} W_{t+1}`
(Gram-Schmidt on the rows instead when the Cholesky fails or :math:`C^{-1}` has an
element >= 100).

Schedule
--------
* The first call initializes: :math:`W` from the orthonormal "1.1" pattern (row r has
  entries at columns r, r+R, r+2R, ..., the first one 1.1, normalized) times
  :math:`\sqrt{1 / (2 + (D+R)\alpha/D)}`, :math:`\rho = d_{ii} = \epsilon`; then 3 updating
  passes over copies of :math:`X_0` (1 pass when N <= R); then :math:`X_0` itself is processed.
* The estimate is updated on calls with t <= 10 and then whenever
  (t - 10) is a multiple of ``update_period``.  Other calls only apply (:math:`\hat X`).
* :meth:`OnlineNaturalGradient.freeze` stops updates (Kaldi freezes the preconditioners in
  the first step of backstitch training).
* If ``rank >= D`` the rank is reduced to D - 1 (with a warning); a one-column input is
  returned unchanged with scale 1.

Factored output
---------------
:meth:`OnlineNaturalGradient.precondition_factors` returns :math:`\hat X_t` as
:math:`(H_t, W_t)` without forming it (and can treat a column of ones as implicit), with the
same state update and the scale from
:math:`\mathrm{tr}(\hat X_t \hat X_t^T) = \mathrm{tr}(X_t X_t^T) - 2\,\mathrm{tr}(L_t)
+ \mathrm{tr}(L_t W_t W_t^T)`, :math:`L_t = H_t^T H_t`.  The :mod:`pkwrap.nn` layers use it
to build the weight gradient :math:`\hat G^T \hat X` from skinny products only.

:meth:`OnlineNaturalGradient.precondition_factors_spliced` does the same for the rows of a
TDNN layer's spliced frames :math:`[x(t + o_1); \dots; x(t + o_K)]` without forming them
(products with row-shifted views of the frames).  Every call records its scale as
``last_scale`` (a float when read; the trainer logs their mean, min and max).

Large float32 CPU products go through oneDNN (:func:`mm`, :func:`linear`): on AMD
processors torch's MKL runs AVX2 kernels where oneDNN runs AVX-512 ones (1.5-2.5x faster
here); ``PKWRAP_ONEDNN=0`` in the environment turns this off.  The small R x R LAPACK
calls (eigh, Cholesky) run on one thread whatever torch's setting (:func:`_one_thread`).

Unlike Kaldi, the state (:math:`W_t, D_t, \rho_t, t`) is saved by :meth:`state_dict`, so that a
resumed run continues exactly.  There is no randomness anywhere.
"""
import contextlib
import logging
import math
import os
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = ["OnlineNaturalGradient", "spliced_linear"]

_EPSILON = 1.0e-10  # floor of rho and of D's elements (Kaldi's epsilon_)
_DELTA = 5.0e-4  # relative floor of rho and D w.r.t. the largest sqrt(c) (delta_)
_NUM_INITIAL_UPDATES = 10  # calls t <= 10 always update
_CONDITION_THRESHOLD = 1.0e6  # c_max / c_min above this -> re-orthogonalize
_ORTHO_THRESHOLD = 1.0e-3  # tolerated max |O - I| before re-orthogonalizing

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- fast GEMM
# torch's float32 CPU matmul goes to MKL, which on AMD processors runs its AVX2 kernels;
# oneDNN (bundled with torch, used by its inductor for linear layers) dispatches on the
# instruction set.  With AVX-512 its kernels are 1.5-2.5x faster than torch.mm (MKL) for
# every large product of this project (measured on a 2-core AMD EPYC with AVX-512, 1
# thread).  With AVX2 only (a 2-core AMD EPYC without AVX-512) it is faster only for tall
# row-major products with a wide inner dimension (forward layers, preconditioner
# projections; up to 2x), and MKL is faster, by about 1.5x, for the products summed over
# the rows (weight gradients G^T X) and for narrow inner dimensions; the rules below
# follow those measurements (``python3 bench/bench_train_step.py`` shows the effect).
# oneDNN takes strided operands, so transposed views cost no copy.  Same float32
# arithmetic, different summation order; the choice depends only on the shapes and the
# CPU, so runs on one machine stay reproducible.
_ONEDNN: Optional[bool] = None
_ONEDNN_MIN_MACS = 1 << 18  # below this the call overhead dominates: use torch.mm


def _onednn_ok() -> bool:
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = False
        if os.environ.get("PKWRAP_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available():
            try:
                op = torch.ops.mkldnn._linear_pointwise
                g = torch.Generator().manual_seed(0)
                a = torch.randn(67, 129, generator=g)
                b = torch.randn(129, 71, generator=g)
                with torch.no_grad():
                    got = op(a, b.t(), None, "none", [], "")
                    got_t = op(a.t().contiguous().t(), b.t(), None, "none", [], "")
                want = a.double() @ b.double()
                _ONEDNN = bool(torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4) and
                               torch.allclose(got_t.double(), want, rtol=1e-4, atol=1e-4))
            except Exception:  # no oneDNN in this torch build, or the op changed
                _ONEDNN = False
    return _ONEDNN


_WIDE_SIMD: Optional[bool] = None


def _wide_simd() -> bool:
    """Whether torch runs AVX-512 (or wider) kernels on this CPU."""
    global _WIDE_SIMD
    if _WIDE_SIMD is None:
        try:
            cap = torch.backends.cpu.get_cpu_capability()
        except Exception:
            cap = ""
        _WIDE_SIMD = cap.startswith("AVX512")
    return _WIDE_SIMD


def _plain2d(t: torch.Tensor) -> bool:
    # oneDNN is fast on row-major or column-major operands without padding (a padded
    # leading dimension, e.g. a column slice, makes it fall back to a slow kernel)
    s0, s1 = t.stride()
    return (s1 == 1 and s0 == t.shape[1]) or (s0 == 1 and s1 == t.shape[0])


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D tensors, with oneDNN for large float32 CPU products (no autograd:
    call it under ``torch.no_grad`` or inside an autograd Function).

    Args:
      a: ``[M][K]``.
      b: ``[K][N]``.
    Returns:
      ``[M][N]``, contiguous.
    """
    if (a.dtype == torch.float32 and b.dtype == torch.float32 and a.device.type == "cpu"
            and b.device.type == "cpu" and a.dim() == 2 and b.dim() == 2
            and a.shape[0] * a.shape[1] * b.shape[1] >= _ONEDNN_MIN_MACS and a.shape[1] > 0
            and _onednn_ok() and (_wide_simd() or (
                # AVX2: tall row-major products with a wide inner dimension only
                a.stride(1) == 1 and a.shape[1] >= 256 and a.shape[0] >= 2 * a.shape[1]))):
        # oneDNN copies its first operand to row-major if it is not (a transposing copy,
        # slow); the second may be row- or column-major.  a @ b = (b^T a^T)^T: pick the
        # order with the smaller copy (a product summed over rows, G^T X, has both operands
        # column-major).
        if not _plain2d(a):
            a = a.contiguous()
        if not _plain2d(b):
            b = b.contiguous()
        M, K = a.shape
        N = b.shape[1]
        copy_a = 0 if a.stride(1) == 1 else M * K
        copy_b = (0 if b.stride(0) == 1 else K * N) + M * N
        if copy_b < copy_a:
            return torch.ops.mkldnn._linear_pointwise(b.t(), a, None, "none", [], "").t().contiguous()
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return a @ b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
           ) -> torch.Tensor:
    """``x W^T + b`` for a 2-D ``x`` with oneDNN where :func:`mm` would use it (no autograd)."""
    if (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.dim() == 2
            and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
            and x.shape[0] * x.shape[1] * weight.shape[0] >= _ONEDNN_MIN_MACS
            and x.shape[1] > 0 and not torch.is_autocast_enabled("cpu") and _onednn_ok()
            # AVX2: oneDNN is slower for inner dimensions that are not a multiple of 32
            and (_wide_simd() or x.shape[1] % 32 == 0)):
        if not _plain2d(x):
            x = x.contiguous()
        if not _plain2d(weight):
            weight = weight.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


def spliced_linear(x: torch.Tensor, weight: torch.Tensor, offsets) -> torch.Tensor:
    r"""``y(j) = sum_k W_k x(j + o_k)`` for frames x ``[B][T][C]``, weight ``[M][K C]`` (block k
    multiplies the frame at offset ``o_k``; ``0 = o_1 < ... < o_K``): ``[B][T - o_K][M]``,
    without forming the spliced frames.  One product of the flat frames with the K blocks
    side by side (a K M-wide output runs faster than K M-wide ones; the products at the
    last frames of each sequence are not used), then the K blocks summed at their frame
    shifts straight into the output (no autograd)."""
    B, T, C = x.shape
    K = len(offsets)
    M = weight.shape[0]
    T_out = T - offsets[-1]
    Wk = weight.reshape(M, K, C).transpose(0, 1).reshape(K * M, C)
    P = linear(x.reshape(B * T, C), Wk).view(B, T, K * M)
    y = P[:, offsets[0]:offsets[0] + T_out, :M].clone()
    for k in range(1, K):
        y.add_(P[:, offsets[k]:offsets[k] + T_out, k * M:(k + 1) * M])
    return y


@contextlib.contextmanager
def _one_thread():
    """Run the enclosed small (R x R, float64) LAPACK calls on one thread.

    On a 2-core machine shared with other processes, a multi-threaded ``eigh`` of an 80 x 80
    matrix costs about 100 times the CPU time of the single-threaded one (the threads spin
    waiting for each other); it also makes the result independent of the thread count."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _orthonormal_special(rows: int, cols: int) -> torch.Tensor:
    """The deterministic R x D matrix with orthonormal rows used to start W.

    Row r has non-zeros at columns r, r + rows, r + 2 rows, ...; the first one is 1.1 and
    the others 1, then the row is normalized (the 1.1 breaks the symmetry between rows).

    Returns:
      A float64 tensor of shape ``[rows][cols]``.
    """
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for r in range(rows):
        c = torch.arange(r, cols, rows)
        vals = torch.ones(len(c), dtype=torch.float64)
        vals[0] = 1.1
        out[r, c] = vals / math.sqrt(1.1 * 1.1 + len(c) - 1)
    return out


class OnlineNaturalGradient:
    """Kaldi's online natural-gradient preconditioner for one matrix of row vectors.

    One object per quantity to precondition (an affine layer has two: one for its input
    with a ones column appended, one for its output derivative).  See the module docstring
    for the math; equation labels there are referred to below.

    Args:
      rank:
        Rank R of the Fisher-matrix correction (Kaldi: 20 for inputs, 80 for output
        derivatives of ``NaturalGradientAffineComponent``).  Reduced to D - 1 if >= D.
      update_period:
        After the first 11 calls, update the estimate only every ``update_period`` calls
        (Kaldi's components use 4).
      num_samples_history:
        Time constant, in rows, of the forgetting factor: eta = 1 - exp(-N / it), capped at 0.9.
      num_minibatches_history:
        If > 0 (must then be > 1), eta = 1 / num_minibatches_history instead.
      alpha:
        Smoothing of the Fisher matrix towards the identity, see (beta).
    """

    def __init__(self, rank: int = 40, update_period: int = 4,
                 num_samples_history: float = 2000.0,
                 num_minibatches_history: float = 0.0, alpha: float = 4.0):
        if int(rank) <= 0:
            raise ValueError(f"OnlineNaturalGradient: rank must be > 0, got {rank}")
        if int(update_period) <= 0:
            raise ValueError(f"OnlineNaturalGradient: update_period must be > 0, got {update_period}")
        if not (0.0 < num_samples_history <= 1.0e6):
            raise ValueError("OnlineNaturalGradient: num_samples_history must be in (0, 1e6], "
                             f"got {num_samples_history}")
        if not (num_minibatches_history == 0.0 or 1.0 < num_minibatches_history < 1.0e6):
            raise ValueError("OnlineNaturalGradient: num_minibatches_history must be 0 or in "
                             f"(1, 1e6), got {num_minibatches_history}")
        if not alpha >= 0.0:
            raise ValueError(f"OnlineNaturalGradient: alpha must be >= 0, got {alpha}")
        # Options (Kaldi's rank_, update_period_, num_samples_history_, ...).
        self.rank = int(rank)
        self.update_period = int(update_period)
        self.num_samples_history = float(num_samples_history)
        self.num_minibatches_history = float(num_minibatches_history)
        self.alpha = float(alpha)
        # State.  t: number of completed calls (0 = not initialized yet).
        self.t = 0
        self.frozen = False
        self.W_t = None  # [R][D], dtype and device of the inputs
        self.d_t = None  # [R] float64 on the CPU (diagonal of D_t)
        self.rho_t = -1.0e10
        self._gram = None  # (W, W W^T in float64) of the last W a scale was computed with
        # Diagnostics of the last call (not part of Kaldi's state).
        self.last_updated = False
        self.last_reorthogonalized = False
        self.last_num_floored = 0
        self._last_scale = None  # the scale returned by the last call (see last_scale)
        self._warned_gram_schmidt = False

    @property
    def last_scale(self) -> Optional[float]:
        """The scale returned by the last call, as a float (None before the first call).

        Kept as the 0-dim tensor the call returned and converted only when read, so that a
        call on a GPU does not wait for the device."""
        v = self._last_scale
        return None if v is None else float(v)

    @last_scale.setter
    def last_scale(self, value) -> None:
        self._last_scale = value

    # ------------------------------------------------------------------ options
    def eta(self, N: int) -> float:
        """The forgetting factor for a minibatch of N rows (Kaldi's ``Eta``)."""
        if self.num_minibatches_history > 0.0:
            return 1.0 / self.num_minibatches_history
        ans = 1.0 - math.exp(-N / self.num_samples_history)
        return min(ans, 0.9)

    def freeze(self, frozen: bool = True) -> None:
        """Stop (or resume) updating the Fisher estimate; preconditioning still happens."""
        self.frozen = bool(frozen)

    def updating(self) -> bool:
        """Whether the next call will update the estimate."""
        return (not self.frozen and
                (self.t <= _NUM_INITIAL_UPDATES or
                 (self.t - _NUM_INITIAL_UPDATES) % self.update_period == 0))

    # ------------------------------------------------------------------ main
    @torch.no_grad()
    def precondition_directions(self, X: torch.Tensor, in_place: bool = False
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Precondition the rows of X with the current estimate, updating it when due.

        Args:
          X:
            The ``[N][D]`` floating-point matrix of row vectors (not modified unless in_place).
          in_place:
            Write X_hat into X (saves a copy of an ``[N][D]`` matrix; X must be contiguous
            and of float32/float64 dtype).
        Returns:
          ``(X_hat, scale)``: X_hat ``[N][D]`` (same dtype/device as X) is X times
          ``beta_t G_t^{-1}`` (eqn. X-hat), **not** multiplied by scale; scale is a 0-dim
          float64 tensor on X's device, sqrt(|X|_F^2 / |X_hat|_F^2) (1 if X is zero).
        """
        if X.dim() != 2:
            raise ValueError(f"precondition_directions: expected a 2-D matrix, got shape {tuple(X.shape)}")
        if not X.is_floating_point():
            raise ValueError(f"precondition_directions: expected a floating-point matrix, got {X.dtype}")
        N, D = X.shape
        if D == 1:
            self.last_scale = 1.0
            return X.clone(), torch.ones((), dtype=torch.float64, device=X.device)
        if self.W_t is not None and self.W_t.shape[1] != D:
            raise ValueError(f"precondition_directions: this preconditioner was set up for dimension "
                             f"{self.W_t.shape[1]}, got a matrix with {D} columns")
        if self.t == 0:
            self._init(X)
        in_dtype = X.dtype
        X = X.to(self.W_t.dtype)
        initial_product = torch.linalg.vector_norm(X).square()
        X_hat = self._precondition_internal(X, initial_product, self.updating(), in_place)
        final_product = torch.linalg.vector_norm(X_hat).square()
        scale = torch.where(initial_product > 0,
                            torch.sqrt(initial_product.double() / final_product.double()),
                            torch.ones((), dtype=torch.float64, device=X.device))
        self.last_scale = scale
        self.t += 1
        return X_hat.to(in_dtype), scale

    __call__ = precondition_directions

    def _init_default(self, D: int, dtype: torch.dtype, device: torch.device) -> None:
        if self.rank >= D:
            logger.warning("Rank %d of online preconditioner is >= dim %d, setting it to %d "
                           "(but this is probably still too high)", self.rank, D, D - 1)
            self.rank = D - 1
        R = self.rank
        self.rho_t = _EPSILON
        self.d_t = torch.full((R,), _EPSILON, dtype=torch.float64)
        E_tii = 1.0 / (2.0 + (D + R) * self.alpha / D)
        self.W_t = (_orthonormal_special(R, D) * math.sqrt(E_tii)).to(dtype=dtype, device=device)

    def _init(self, X0: torch.Tensor) -> None:
        """First call: start from the default and run 3 (or 1) updating passes on X0."""
        dtype = X0.dtype if X0.dtype in (torch.float32, torch.float64) else torch.float32
        tmp = OnlineNaturalGradient(self.rank, self.update_period, self.num_samples_history,
                                    self.num_minibatches_history, self.alpha)
        tmp._init_default(X0.shape[1], dtype, X0.device)
        tmp.t = 1  # the copy never re-enters _init
        num_iters = 1 if X0.shape[0] <= tmp.rank else 3
        X0 = X0.to(dtype)
        tr = torch.linalg.vector_norm(X0).square()
        for _ in range(num_iters):
            tmp._precondition_internal(X0, tr, True, False, want_output=False)
            tmp.t += 1
        self.rank = tmp.rank
        self.W_t, self.d_t, self.rho_t = tmp.W_t, tmp.d_t, tmp.rho_t

    @staticmethod
    def _compute_et(d: torch.Tensor, beta: float):
        e = 1.0 / (beta / d + 1.0)  # (E)
        sqrt_e = e.sqrt()
        return e, sqrt_e, 1.0 / sqrt_e

    def _precondition_internal(self, X: torch.Tensor, tr_X_Xt: torch.Tensor,
                               updating: bool, in_place: bool, want_output: bool = True
                               ) -> Optional[torch.Tensor]:
        """X_hat (None when not ``want_output``: the passes of :meth:`_init` only update)."""
        N, D = X.shape
        W_t = self.W_t
        H_t = mm(X, W_t.t())  # (X-hat): H_t = X_t W_t^T, [N][R]
        self.last_updated = updating
        self.last_reorthogonalized = False
        self.last_num_floored = 0
        if updating:
            J_t = mm(H_t.t(), X)  # [R][D]
            if N > D:
                L_t = W_t @ J_t.t()
            else:
                L_t = mm(H_t.t(), H_t)
            self._update(N, D, float(tr_X_Xt), J_t, L_t)
        if not want_output:
            return None
        # X_hat = X - H_t W_t with the W_t from before the update
        return X.addmm_(H_t, W_t, alpha=-1.0) if in_place else torch.addmm(X, H_t, W_t, alpha=-1.0)

    @torch.no_grad()
    def precondition_factors(self, x: torch.Tensor, ones_column: bool = False,
                             sqnorm: Optional[float] = None
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like :meth:`precondition_directions`, but returns X_hat in factored form.

        X is ``x``, or ``[x, 1]`` (a column of ones appended) when ``ones_column`` is set, and is
        never formed; X_hat = X - H W.  Natural-gradient layers use this to build the weight
        gradient without any extra ``[N][D]`` matrix.  The estimate is updated exactly as
        :meth:`precondition_directions` would (same equations); the scale uses
        ``|X_hat|^2 = |X|^2 - 2 tr(L) + tr(L W W^T)`` with ``L = H^T H``, the same quantity
        up to rounding.

        Args:
          x:
            ``[N][D']`` with D = D' + 1 if ``ones_column`` else D'.
          ones_column:
            Whether X has a column of ones appended to x.
          sqnorm:
            ``|x|^2`` if the caller has it already (e.g. from a fused kernel that wrote x);
            computed here otherwise.
        Returns:
          ``(H, W, scale)``: H ``[N][R]``, W ``[R][D]`` (the estimate the call used; later calls
          do not modify it in place), scale a 0-dim float64 tensor as in
          :meth:`precondition_directions`.
        """
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"precondition_factors: expected a 2-D floating-point matrix, got "
                             f"{tuple(x.shape)} {x.dtype}")
        N, Dx = x.shape
        D = Dx + (1 if ones_column else 0)
        one = torch.ones((), dtype=torch.float64, device=x.device)
        if D == 1:
            self.last_scale = 1.0
            return x.new_zeros(N, 0), x.new_zeros(0, D), one
        if self.W_t is not None and self.W_t.shape[1] != D:
            raise ValueError(f"precondition_factors: this preconditioner was set up for dimension "
                             f"{self.W_t.shape[1]}, got {D} columns")
        if self.t == 0:
            self._init(torch.cat([x, x.new_ones(N, 1)], 1) if ones_column else x)
        W_t = self.W_t
        x = x.to(W_t.dtype)
        H = mm(x, W_t[:, :Dx].t())
        if sqnorm is None:
            tr = torch.linalg.vector_norm(x).square()
        else:
            tr = torch.tensor(float(sqnorm), dtype=torch.float64, device=x.device)
        if ones_column:
            H += W_t[:, Dx]
            tr = tr + N
        updating = self._start_call()
        L = H.t() @ H  # R x R from a long inner dim: torch's BLAS is faster here
        if updating:
            J = mm(H.t(), x)
            if ones_column:
                J = torch.cat([J, H.sum(0)[:, None]], 1)
            L_upd = W_t @ J.t() if N > D else L
            self._update(N, D, float(tr), J, L_upd)
        return H, W_t, self._factored_scale(tr, L, W_t)

    def _start_call(self) -> bool:
        """Resets the per-call diagnostics of a factored call; returns whether this call
        updates the estimate."""
        self.last_reorthogonalized = False
        self.last_num_floored = 0
        self.last_updated = self.updating()
        return self.last_updated

    def _factored_scale(self, tr: torch.Tensor, L: torch.Tensor, W_t: torch.Tensor
                        ) -> torch.Tensor:
        """Scale from |X|^2 = tr and L = H^T H (|X_hat|^2 = tr - 2 tr(L) + tr(L W W^T));
        ends the call (t += 1)."""
        one = torch.ones((), dtype=torch.float64, device=tr.device)
        L64 = L.double()
        if self._gram is None or self._gram[0] is not W_t:  # W changes on updating calls only
            self._gram = (W_t, (W_t @ W_t.t()).double())
        WWt = self._gram[1]
        final = tr.double() - 2.0 * torch.trace(L64) + (L64 * WWt).sum()
        scale = torch.where((tr > 0) & (final > 0), torch.sqrt(tr.double() / final), one)
        self.last_scale = scale
        self.t += 1
        return scale

    @torch.no_grad()
    def precondition_factors_spliced(self, x: torch.Tensor, offsets, ones_column: bool = False,
                                     frame_sqnorm: Optional[torch.Tensor] = None
                                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`precondition_factors` for the rows of spliced frames, without forming them.

        The rows are ``X[(b, j)] = [x[b, j + o_1], ..., x[b, j + o_K] (, 1)]`` for
        ``j < T - o_K`` (``0 = o_1 < ... < o_K``), in order b-major, as a TDNN layer splices
        its input.  Same state update, same scale; products with X are sums of products
        with row-shifted views of the flat ``[B T][C]`` frames (the rows straddling two
        sequences are computed and discarded, or multiplied by zero).

        Args:
          x:
            ``[B][T][C]`` contiguous frames.
          offsets:
            The relative offsets ``o_1 = 0 < ... < o_K``.
          ones_column:
            Whether X has a column of ones appended.
          frame_sqnorm:
            ``[B][T]`` squared norms of the frames of x if the caller has them already
            (computed here otherwise).
        Returns:
          ``(W, scale)`` as in :meth:`precondition_factors` (H is not returned).
        """
        B, T, C = x.shape
        offs = [int(o) for o in offsets]
        if offs[0] != 0 or sorted(set(offs)) != offs or T <= offs[-1] or not x.is_contiguous():
            raise ValueError(f"precondition_factors_spliced: bad offsets {offs} or input "
                             f"{tuple(x.shape)} (needs contiguous [B][T][C], T > max offset)")
        K = len(offs)
        span = offs[-1]
        T_out = T - span
        R = B * T - span  # flat rows computed
        N = B * T_out
        D = K * C + (1 if ones_column else 0)
        if self.W_t is not None and self.W_t.shape[1] != D:
            raise ValueError(f"precondition_factors_spliced: this preconditioner was set up for "
                             f"dimension {self.W_t.shape[1]}, got {D} columns")
        if self.t == 0:
            X = torch.cat([x[:, o:o + T_out] for o in offs], -1).reshape(N, K * C)
            self._init(torch.cat([X, X.new_ones(N, 1)], 1) if ones_column else X)
        W_t = self.W_t
        x = x.to(W_t.dtype)
        xf = x.reshape(B * T, C)
        Rk = W_t.shape[0]
        H3 = spliced_linear(x, W_t[:, :K * C], offs)  # [B][T_out][R]
        if ones_column:
            H3 += W_t[:, K * C]
        H = H3.view(N, Rk)
        # |X|^2 from one pass: squared frame norms, summed over each offset's window
        if frame_sqnorm is None:
            fn = torch.linalg.vector_norm(x, dim=2).square()  # [B][T]
        else:
            if tuple(frame_sqnorm.shape) != (B, T):
                raise ValueError(f"precondition_factors_spliced: frame_sqnorm has shape "
                                 f"{tuple(frame_sqnorm.shape)}, expected {(B, T)}")
            fn = frame_sqnorm
        tr = sum(fn[:, o:o + T_out].sum() for o in offs)
        if ones_column:
            tr = tr + N
        updating = self._start_call()
        L = H.t() @ H  # R x R from a long inner dim: torch's BLAS is faster here
        if updating:
            Hz = H.new_zeros(B * T, Rk)  # H on the flat rows, zero where not valid
            Hz.view(B, T, Rk)[:, :T_out] = H3
            Hz = Hz[:R]
            J = [mm(Hz.t(), xf[o:o + R]) for o in offs]
            if ones_column:
                J.append(H.sum(0)[:, None])
            J = torch.cat(J, 1)
            L_upd = W_t @ J.t() if N > D else L
            self._update(N, D, float(tr), J, L_upd)
        return W_t, self._factored_scale(tr, L, W_t)

    def _update(self, N: int, D: int, tr_X_Xt: float, J_t: torch.Tensor, L_t: torch.Tensor) -> None:
        """Update W_t, d_t, rho_t from J_t = H_t^T X_t and L_t = H_t^T H_t (eqns Z to W_{t+1})."""
        R = self.rank
        W_t = self.W_t
        eta = self.eta(N)
        rho_t = self.rho_t
        d_t = self.d_t
        K_t = mm(J_t, J_t.t())
        # The small R x R algebra runs in float64 on the CPU, as Kaldi does.
        LK = torch.cat([L_t, K_t], 0).to(device="cpu", dtype=torch.float64)
        L_t, K_t = LK[:R], LK[R:]
        L_t = 0.5 * (L_t + L_t.t())
        K_t = 0.5 * (K_t + K_t.t())

        beta_t = rho_t * (1.0 + self.alpha) + self.alpha * float(d_t.sum()) / D  # (beta)
        e_t, sqrt_e_t, inv_sqrt_e_t = self._compute_et(d_t, beta_t)
        p_t = d_t + rho_t  # diagonal of D_t + rho_t I
        etaN, eta1 = eta / N, 1.0 - eta
        S = inv_sqrt_e_t[:, None] * L_t * inv_sqrt_e_t[None, :]
        Z_t = (etaN * etaN) * (inv_sqrt_e_t[:, None] * K_t * inv_sqrt_e_t[None, :]) \
            + (etaN * eta1) * (S * p_t[None, :] + p_t[:, None] * S) \
            + torch.diag(eta1 * eta1 * p_t * p_t)  # (Z)
        if not (math.isfinite(tr_X_Xt) and bool(torch.isfinite(Z_t).all())):
            # Kaldi would crash or poison its estimate; we keep the old one.  The output is
            # non-finite anyway, and NGSGD skips such an update with a warning.
            logger.warning("OnlineNaturalGradient: non-finite input (inf/NaN); "
                           "not updating the Fisher-matrix estimate")
            self.last_updated = False
            return
        z_scale = max(1.0, float(torch.trace(Z_t)))
        with _one_thread():
            c_t, U_t = torch.linalg.eigh(Z_t / z_scale)
        c_t, U_t = c_t.flip(0) * z_scale, U_t.flip(1)  # largest first
        must_reorthogonalize = bool(c_t[0] > _CONDITION_THRESHOLD * c_t[R - 1])
        c_floor = (rho_t * (1.0 - eta)) ** 2
        nf = int((c_t < c_floor).sum())
        if nf > 0:
            c_t = c_t.clamp(min=c_floor)
            must_reorthogonalize = True
        self.last_num_floored = nf

        sqrt_c_t = c_t.sqrt()
        rho_t1 = (eta / N * tr_X_Xt + (1.0 - eta) * (D * rho_t + float(d_t.sum()))
                  - float(sqrt_c_t.sum())) / (D - R)  # (rho)
        d_t1 = sqrt_c_t - rho_t1
        floor_val = max(_EPSILON, _DELTA * float(sqrt_c_t.max()))
        rho_t1 = max(rho_t1, floor_val)
        d_t1 = d_t1.clamp(min=floor_val)

        # (W_{t+1}) = A_t B_t
        beta_t1 = rho_t1 * (1.0 + self.alpha) + self.alpha * float(d_t1.sum()) / D
        if not beta_t1 > 0.0:
            raise RuntimeError(f"OnlineNaturalGradient: beta_t1 = {beta_t1} is not positive")
        _, sqrt_e_t1, inv_sqrt_e_t1 = self._compute_et(d_t1, beta_t1)
        w_coeff = (eta1 / etaN) * p_t
        B_t = torch.addcmul(J_t, w_coeff.to(J_t)[:, None], W_t)
        A_t = U_t.t() * (etaN * sqrt_e_t1 / sqrt_c_t)[:, None] * inv_sqrt_e_t[None, :]
        W_t1 = mm(A_t.to(B_t), B_t)
        if must_reorthogonalize:
            W_t1 = self._reorthogonalize(W_t1, sqrt_e_t1, inv_sqrt_e_t1)
        self.W_t = W_t1
        self.d_t = d_t1
        self.rho_t = rho_t1

    def _reorthogonalize(self, W_t1: torch.Tensor, sqrt_e_t1: torch.Tensor,
                         inv_sqrt_e_t1: torch.Tensor) -> torch.Tensor:
        """Make R_{t+1} = E^{-1/2} W_{t+1} orthonormal again (Cholesky, else Gram-Schmidt)."""
        O = (W_t1 @ W_t1.t()).to(device="cpu", dtype=torch.float64)
        O = inv_sqrt_e_t1[:, None] * O * inv_sqrt_e_t1[None, :]
        R = O.shape[0]
        if float((O - torch.eye(R, dtype=torch.float64)).abs().tril().max()) <= _ORTHO_THRESHOLD:
            return W_t1
        self.last_reorthogonalized = True
        with _one_thread():
            C, info = torch.linalg.cholesky_ex(O)
        ok = int(info) == 0
        if ok:
            with _one_thread():
                Cinv = torch.linalg.solve_triangular(C, torch.eye(R, dtype=torch.float64),
                                                     upper=False)
            ok = bool(torch.isfinite(Cinv).all()) and bool(Cinv.max() < 100.0)
        if not ok:
            # Kaldi warns every time; this happens on (nearly) rank-deficient data, e.g. the
            # output derivative of a zero-initialized output layer, so warn once per object.
            (logger.debug if self._warned_gram_schmidt else logger.warning)(
                "Cholesky failed or out of range while re-orthogonalizing R_t (rank %d, dim %d); "
                "using Gram-Schmidt", self.rank, W_t1.shape[1])
            self._warned_gram_schmidt = True
            with _one_thread():
                Q, Rq = torch.linalg.qr(W_t1.t().double().cpu())  # columns of Q: Gram-Schmidt of rows
            Q = Q * torch.sign(torch.diagonal(Rq))[None, :]
            return (Q.t() * sqrt_e_t1[:, None]).to(W_t1)
        M = sqrt_e_t1[:, None] * Cinv * inv_sqrt_e_t1[None, :]  # E^{1/2} C^{-1} E^{-1/2}
        return M.to(W_t1) @ W_t1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly: options and W_t, d_t, rho_t, t, frozen."""
        return {
            "rank": self.rank, "update_period": self.update_period,
            "num_samples_history": self.num_samples_history,
            "num_minibatches_history": self.num_minibatches_history,
            "alpha": self.alpha, "t": self.t, "frozen": self.frozen,
            "W_t": None if self.W_t is None else self.W_t.detach().clone(),
            "d_t": None if self.d_t is None else self.d_t.clone(),
            "rho_t": self.rho_t,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (W_t keeps the device it was saved on
        until the next call moves nothing: pass tensors on the right device, or call :meth:`to`)."""
        missing = {"rank", "t", "W_t", "d_t", "rho_t"} - set(state)
        if missing:
            raise KeyError(f"OnlineNaturalGradient.load_state_dict: missing keys {sorted(missing)}")
        self.rank = int(state["rank"])
        self.update_period = int(state.get("update_period", self.update_period))
        self.num_samples_history = float(state.get("num_samples_history", self.num_samples_history))
        self.num_minibatches_history = float(state.get("num_minibatches_history",
                                                       self.num_minibatches_history))
        self.alpha = float(state.get("alpha", self.alpha))
        self.t = int(state["t"])
        self.frozen = bool(state.get("frozen", False))
        W = state["W_t"]
        if W is not None and self.W_t is not None:
            W = W.to(device=self.W_t.device)
        self.W_t = None if W is None else W.detach().clone()
        self.d_t = None if state["d_t"] is None else state["d_t"].detach().to("cpu", torch.float64).clone()
        self.rho_t = float(state["rho_t"])

    def to(self, device: torch.device) -> "OnlineNaturalGradient":
        """Move W_t to ``device`` (d_t stays on the CPU)."""
        if self.W_t is not None:
            self.W_t = self.W_t.to(device)
        return self

    def __repr__(self) -> str:
        return (f"OnlineNaturalGradient(rank={self.rank}, update_period={self.update_period}, "
                f"num_samples_history={self.num_samples_history}, "
                f"num_minibatches_history={self.num_minibatches_history}, alpha={self.alpha}, "
                f"t={self.t}, frozen={self.frozen})")
