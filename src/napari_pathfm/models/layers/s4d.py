"""S4D: the diagonal structured state-space layer, written from its formulas.

Each of the ``H`` channels is a linear time-invariant system with ``N/2`` complex
diagonal modes (conjugate pairs give ``N`` real states). With the continuous
parameters ``A = -exp(log_A_real) + i·A_imag`` (S4D-Lin init: ``A_real = 1/2``,
``A_imag = π n``), a complex ``C`` and a step ``dt = exp(log_dt)``, zero-order-hold
discretisation gives ``dtA = dt·A`` and ``C̃ = C·(exp(dtA) - 1)/A``; the layer is the
causal convolution of the input with the kernel

    K[h, l] = 2·Re( Σ_n C̃[h, n] · exp(dtA[h, n] · l) ),   l = 0 … L-1,

plus a skip ``D·u``, a GELU and a 1x1 convolution ``H → 2H`` followed by a GLU.

Why the kernel is computed in blocks: the direct Vandermonde product needs
``H·N/2·L`` complex exponentials and as much memory (0.5 GB for one 30 000-patch
bag), which made a straightforward S4D slower than TransMIL on a CPU. Writing
``l = j·c + i`` with ``c ≈ √L`` splits ``exp(dtA·l) = exp(dtA·j·c) · exp(dtA·i)``,
so small tables of ``O(H·N/2·√L)`` exponentials and one batched real matrix
product give the same kernel (to float rounding) in ``O(H·L)`` memory.

Without autograd (eval mode under ``no_grad``/``inference_mode``) the convolution,
skip, GELU and output mixing run a block of channels (or positions) at a time in
reused buffers: FFTs of a few channels stay in cache, and a 200 000-patch bag
never holds a full padded or frequency-domain copy. Long bags (``16 · chunk_len``
positions and more) are convolved in fixed-length chunks that pass the diagonal
state from one chunk to the next, so inference time is linear in the bag length
instead of ``L log L``. Training uses the plain differentiable path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["S4D", "S4DKernel", "fft_length", "optim_groups"]


def fft_length(n: int) -> int:
    """Smallest ``2^a · 3^b · 5^c`` that is ``>= n``: a length that FFTs handle fast.

    >>> fft_length(60000), fft_length(60022)
    (60000, 60750)
    """
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def optim_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups that honour the ``_optim`` hints of S4D parameters.

    The state-space parameters (``log_dt``, ``log_A_real``, ``A_imag``) carry
    ``p._optim = {"lr": ..., "weight_decay": 0.0}`` as in the S4 reference code:
    they train best with no weight decay and a learning rate of at most 1e-3.
    Their group uses ``min(hint lr, lr)``; every other parameter uses ``lr`` and
    ``weight_decay``.

    Returns
    -------
    list of dict
        Groups for ``torch.optim.Adam(groups)`` and friends.
    """
    plain, hinted = [], {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        hint = getattr(p, "_optim", None)
        if hint is None:
            plain.append(p)
        else:
            key = tuple(sorted(hint.items()))
            hinted.setdefault(key, []).append(p)
    groups = [{"params": plain, "lr": lr, "weight_decay": weight_decay}] if plain else []
    for key, params in hinted.items():
        hint = dict(key)
        groups.append({"params": params, **hint, "lr": min(hint.get("lr", lr), lr)})
    return groups


def _exp_table(dtA: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``exp(dtA[..., None] · steps)`` via ``polar``, which is faster than complex ``exp`` on CPU."""
    return torch.polar(torch.exp(dtA.real[..., None] * steps), dtA.imag[..., None] * steps)


def _powers(dtA: torch.Tensor, n: int) -> torch.Tensor:
    """``exp(dtA[..., None] · i)`` for ``i = 0 … n-1``, from two tables of ``⌈√n⌉`` exponentials each."""
    g = math.isqrt(max(n - 1, 0)) + 1
    steps = torch.arange(g, device=dtA.device, dtype=torch.float32)
    hi, lo = _exp_table(dtA, steps * g), _exp_table(dtA, steps)
    return (hi[..., :, None] * lo[..., None, :]).flatten(-2)[..., :n]


def _copy_tiled(dst: torch.Tensor, src: torch.Tensor, tile: int = 1024) -> None:
    """``dst.copy_(src)``; a transposed ``src`` is copied in column tiles, 3x faster on CPU."""
    if src.stride(-1) == 1 or src.device.type != "cpu":
        dst.copy_(src)
        return
    for l0 in range(0, src.shape[-1], tile):
        dst[..., l0 : l0 + tile].copy_(src[..., l0 : l0 + tile])


class S4DKernel(nn.Module):
    """Trainable S4D convolution kernel ``K`` of shape ``(H, L)`` for any length ``L``.

    Parameters
    ----------
    d_model : int
        Channels ``H``.
    d_state : int
        State size ``N``; ``N/2`` complex modes per channel are stored.
    dt_min, dt_max : float
        Range of the log-uniform initial step size.
    lr : float
        Learning-rate hint put on ``log_dt``, ``log_A_real`` and ``A_imag`` (see
        :func:`optim_groups`).
    """

    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 1e-3, dt_max: float = 1e-1, lr: float = 1e-3):
        super().__init__()
        H, M = d_model, max(1, d_state // 2)
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.full((H, M), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(M, dtype=torch.float32).repeat(H, 1))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(H, M, dtype=torch.cfloat)).clone())
        for p in (self.log_dt, self.log_A_real, self.A_imag):
            p._optim = {"lr": lr, "weight_decay": 0.0}

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dtA, C̃)``, both complex ``(H, N/2)``, by zero-order hold."""
        dt = self.log_dt.exp()
        A = torch.complex(-self.log_A_real.exp(), self.A_imag)
        dtA = A * dt[:, None]
        return dtA, torch.view_as_complex(self.C) * torch.expm1(dtA) / A

    def forward(self, L: int, chunk: int | None = None, channels: slice | None = None) -> torch.Tensor:
        """Kernel ``K`` (H, L) float32 by the blocked Vandermonde product.

        With ``l = j·c + i``, ``Q[h, j, n] = 2·C̃·exp(dtA·j·c)`` (H, J, N/2) and
        ``P[h, n, i] = exp(dtA·i)`` (H, N/2, c), ``K`` laid out as (H, J, c) is
        ``Re(Q @ P) = [Re Q, -Im Q] @ [Re P; Im P]``, one real batched matmul.
        ``Q`` itself is the outer product of two tables of ``√J`` powers each,
        so only ``H·N/2·(c + 2√J)`` complex exponentials are evaluated, as
        ``polar(exp(Re), Im)``. ``chunk`` is ``c`` (default ``⌈√L⌉``);
        ``channels`` restricts the kernel to a slice of the ``H`` channels.
        """
        dtA, Ct = self.discretize()
        if channels is not None:
            dtA, Ct = dtA[channels], Ct[channels]
        H, M = dtA.shape
        c = max(1, chunk or math.isqrt(max(L - 1, 0)) + 1)
        J = -(-L // c)
        g = math.isqrt(J - 1) + 1
        Jh = -(-J // g)
        steps = torch.arange(max(c, g, Jh), device=dtA.device, dtype=torch.float32)
        P = _exp_table(dtA, steps[:c])
        lo = _exp_table(dtA, steps[:g] * c) * (2 * Ct)[..., None]
        hi = _exp_table(dtA, steps[:Jh] * (g * c))
        Q = (hi[..., :, None] * lo[..., None, :]).reshape(H, M, Jh * g)[..., :J]
        K = torch.cat([Q.real, -Q.imag], 1).transpose(1, 2) @ torch.cat([P.real, P.imag], 1)
        return K.reshape(H, J * c)[:, :L]

    def naive(self, L: int) -> torch.Tensor:
        """Reference kernel straight from the formula; needs ``H·N/2·L`` complex memory."""
        dtA, Ct = self.discretize()
        l = torch.arange(L, device=dtA.device, dtype=torch.float32)
        return 2 * torch.einsum("hn,hnl->hl", Ct, torch.exp(dtA[:, :, None] * l)).real


class S4D(nn.Module):
    """S4D layer: causal long convolution with the S4D kernel, skip, GELU, GLU mixing.

    Parameters
    ----------
    d_model : int
        Channels ``H``.
    d_state : int
        State size ``N`` (``N/2`` complex modes).
    dropout : float
        Dropout after the GELU.
    transposed : bool
        Input and output are ``(B, H, L)`` if True (the layout the FFT runs in,
        no copy), ``(B, L, H)`` otherwise.
    lr : float
        Learning-rate hint for the state-space parameters.
    fft_block : int
        Complex elements per FFT block on the CPU: channels are convolved in groups
        of ``fft_block // (B·(n/2+1))`` so that the frequency buffers stay in cache.
    fft_block_gpu : int
        The same on other devices, 64x larger: a GPU is limited by kernel launches,
        not cache, and 128 Mi elements (1 GiB complex) fit any card that runs this.
    chunk_len : int
        Inference on bags of at least ``16 · chunk_len`` positions runs in chunks of
        this many positions (:meth:`_conv_chunked`), so its time grows linearly
        with the bag; shorter bags take one full-length FFT, which is faster there.

    Notes
    -----
    In eval mode under ``torch.no_grad``/``inference_mode`` the kernel's FFT is
    cached for the last ``(L, FFT length, device)``; the cache is keyed on the
    kernel parameters' storage and version counters, so any optimizer step,
    ``load_state_dict`` or ``.to()`` recomputes it, and ``train()``/``eval()``
    drop it. The cache only helps when the same bag length comes again (a
    re-run, a benchmark); kernel FFTs larger than ``cache_max_bytes`` (512 MiB,
    about 130 000 patches at ``H = 512``) are not kept. Set ``cache_kernel =
    False`` or call :meth:`clear_cache` to measure cold times. The convolution
    runs in the parameters' precision (float32) even under autocast.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        dropout: float = 0.0,
        transposed: bool = True,
        lr: float = 1e-3,
        fft_block: int = 1 << 21,
        fft_block_gpu: int = 1 << 27,
        chunk_len: int = 256,
    ):
        super().__init__()
        self.d_model = d_model
        self.transposed = transposed
        self.fft_block, self.fft_block_gpu = fft_block, fft_block_gpu
        self.D = nn.Parameter(torch.randn(d_model))
        self.kernel = S4DKernel(d_model, d_state, lr=lr)
        self.dropout = nn.Dropout(dropout)
        self.output_linear = nn.Conv1d(d_model, 2 * d_model, kernel_size=1)
        self.chunk_len = chunk_len
        self.cache_kernel = True
        self.cache_max_bytes = 512 * 2**20
        self._cache = None

    def clear_cache(self) -> None:
        """Forget the cached kernel FFT."""
        self._cache = None

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _cache_key(self, L: int, n: int):
        params = tuple((p.device, p.dtype, p.data_ptr(), p._version) for p in self.kernel.parameters())
        return (L, n, torch.is_inference_mode_enabled(), params)

    def kernel_fft(self, L: int, n: int) -> torch.Tensor:
        """``rfft`` of the length-``L`` kernel zero-padded to ``n``: (H, n//2 + 1) complex.

        Built a block of channels at a time, so the time-domain kernel never
        exists in full.
        """
        use_cache = self.cache_kernel and not self.training and not torch.is_grad_enabled()
        key = self._cache_key(L, n) if use_cache else None
        if use_cache and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        H, step = self.d_model, self._block(1, n)
        if step >= H:
            k_f = torch.fft.rfft(self.kernel(L), n=n)
        elif torch.is_grad_enabled():
            blocks = [self.kernel(L, channels=slice(s, s + step)) for s in range(0, H, step)]
            k_f = torch.cat([torch.fft.rfft(k, n=n) for k in blocks])
        else:
            k_f = torch.empty(H, n // 2 + 1, dtype=self.D.dtype.to_complex(), device=self.D.device)
            for s in range(0, H, step):
                k_f[s : s + step] = torch.fft.rfft(self.kernel(L, channels=slice(s, s + step)), n=n)
        if use_cache and self._cacheable(n):
            self._cache = (key, k_f)
        return k_f

    def _budget(self) -> int:
        return self.fft_block if self.D.device.type == "cpu" else self.fft_block_gpu

    def _block(self, B: int, n: int) -> int:
        return max(8, self._budget() // max(1, B * (n // 2 + 1)))

    def _cacheable(self, n: int) -> bool:
        return self.cache_kernel and self.d_model * (n // 2 + 1) * 8 <= self.cache_max_bytes

    def _conv_autograd(self, u: torch.Tensor, k_f: torch.Tensor, n: int) -> torch.Tensor:
        """``GELU(K * u + D·u)`` with autograd; channel blocks joined by ``cat``."""
        L = u.shape[-1]
        step = self._block(u.shape[0], n)
        parts = [
            torch.fft.irfft(torch.fft.rfft(u[:, s : s + step], n=n) * k_f[s : s + step], n=n)[..., :L]
            for s in range(0, u.shape[1], step)
        ]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return F.gelu(y + u * self.D[:, None])

    @torch.no_grad()
    def _conv_inference(self, u: torch.Tensor, k_f: torch.Tensor | None, n: int) -> torch.Tensor:
        """Same as :meth:`_conv_autograd` without autograd, in reused per-block buffers.

        Each channel block is copied (and transposed, if ``u`` is a transposed
        view) into a zero-padded buffer, transformed, multiplied, transformed
        back into a second buffer and written with the skip and GELU straight
        into the output, so no full-size padded or frequency array exists.
        Without ``k_f`` (too large to cache) the kernel's FFT is made per block.
        """
        B, H, L = u.shape
        step = min(H, self._block(B, n))
        out = u.new_empty(B, H, L)
        for s in range(0, H, step):
            e = min(H, s + step)
            if s == 0 or e - s != step:
                ubuf = u.new_zeros(B, e - s, n)
                fbuf = torch.empty(B, e - s, n // 2 + 1, dtype=u.dtype.to_complex(), device=u.device)
                ybuf = u.new_empty(B, e - s, n)
            _copy_tiled(ubuf[..., :L], u[:, s:e])
            torch.fft.rfft(ubuf, out=fbuf)
            fbuf.mul_(k_f[s:e] if k_f is not None else torch.fft.rfft(self.kernel(L, channels=slice(s, e)), n=n))
            torch.fft.irfft(fbuf, n=n, out=ybuf)
            block = out[:, s:e]
            torch.addcmul(ybuf[..., :L], ubuf[..., :L], self.D[s:e, None], out=block)
            torch.ops.aten.gelu_(block)
        return out

    @torch.no_grad()
    def chunk_tables(self) -> tuple[torch.Tensor, ...]:
        """What :meth:`conv_block` needs for chunks of ``T = chunk_len`` positions, computed once per bag.

        The kernel is a sum of decaying exponentials (``z = exp(dtA)``), so what position ``c·T + i``
        receives from the chunks before its own is ``2·Re Σ_n C̃_n z_n^i S_c[n]``, with the state
        ``S_c[n] = Σ_{s < cT} z_n^{cT-s} u_s`` and ``S_{c+1} = z^T·S_c + Σ_i z^{T-i} u_{cT+i}``.
        Returns ``(z^T, w_in, w_out, k_f)``: ``w_in`` (H, T, 2M) gives a chunk's sums
        ``Σ_i z^{T-i} u_i`` as real and imaginary parts, ``w_out`` (H, 2M, T) turns a state into
        ``2·Re C̃ z^i S``, and ``k_f`` is the FFT (length ``2T``) of the first ``T`` kernel taps.
        """
        T = self.chunk_len
        dtA, Ct = self.kernel.discretize()
        z = _powers(dtA, T + 1)  # z^0 … z^T, (H, M, T + 1)
        z_out = (2 * Ct)[..., None] * z[..., :T]  # 2·C̃·z^i
        k_f = torch.fft.rfft(z_out.real.sum(1), n=2 * T)  # the first T kernel taps
        z_in = z[..., 1:].flip(-1)  # z^(T-i)
        w_in = torch.cat([z_in.real, z_in.imag], 1).transpose(1, 2)  # (H, T, 2M)
        w_out = torch.cat([z_out.real, -z_out.imag], 1)  # (H, 2M, T)
        return z[..., T], w_in, w_out, k_f

    @torch.no_grad()
    def conv_block(
        self, u: torch.Tensor, state: torch.Tensor | None, tables: tuple
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``GELU(K * u + D·u)`` of one block of whole chunks, given the state the earlier blocks left.

        ``u`` is (B, H, P) with ``P`` a multiple of ``chunk_len`` (zero-pad the last block: the
        convolution is causal, so padding changes nothing before it); ``state`` is the complex
        (B, H, M) state before the block (None: the bag starts here); ``tables`` come from
        :meth:`chunk_tables`. Returns the block's output and the state
        after it, so a bag of any length is convolved block by block in memory of one block:
        each chunk by FFTs of length ``2T``, the earlier chunks through the state, a batched real
        matrix product each way and a scan over the block's chunks.
        """
        B, H, P = u.shape
        T = self.chunk_len
        if P % T:
            raise ValueError(f"a block must hold whole chunks of {T} positions, got {P}")
        z_T, w_in, w_out, k_f = tables
        M, C = z_T.shape[-1], P // T
        chunks = u.reshape(B, H, C, T)
        sums = chunks @ w_in  # (B, H, C, 2M)
        sums = torch.complex(sums[..., :M], sums[..., M:])
        states = torch.empty_like(sums)
        prev = state if state is not None else torch.zeros_like(sums[:, :, 0])
        for c in range(C):
            states[:, :, c] = prev
            prev = prev * z_T + sums[:, :, c]
        f = torch.fft.rfft(chunks, n=2 * T).mul_(k_f[:, None])
        y = torch.fft.irfft(f, n=2 * T)[..., :T] + torch.cat([states.real, states.imag], -1) @ w_out
        out = u.new_empty(B, H, P)
        torch.addcmul(y.reshape(B, H, P), u, self.D[:, None], out=out)
        return torch.ops.aten.gelu_(out), prev

    def block_positions(self, B: int) -> int:
        """Positions per block of :meth:`conv_block` on the CPU: whole chunks whose FFTs fit the
        ``fft_block`` budget (16 chunks of 256 at ``H = 512``), so a block stays in cache."""
        per_chunk = B * self.d_model * (self.chunk_len + 1)
        return self.chunk_len * max(1, self._budget() // per_chunk)

    @torch.no_grad()
    def stream(self, B: int, L: int, fill, like: torch.Tensor):
        """Convolve an ``L``-position input block by block; yield ``(l0, n, y)`` per block.

        ``fill(dst, l0, n)`` writes positions ``l0 … l0 + n`` of the input into ``dst`` (B, H, n),
        so a caller can produce the input block by block too (S4 MIL projects its patches there).
        ``y`` is the block's output, (B, H, n) valid positions followed by the zero padding's; the
        state passes from block to block and the tables are made once. ``like`` gives the dtype
        and device of the buffers.
        """
        T, P = self.chunk_len, self.block_positions(B)
        tables, state = self.chunk_tables(), None
        buf = like.new_zeros(B, self.d_model, P)
        for l0 in range(0, L, P):
            n = min(P, L - l0)
            if n < P:
                buf.zero_()  # the padding after the end: causal, so it changes nothing before it
            fill(buf[..., :n], l0, n)
            y, state = self.conv_block(buf[..., : -(-n // T) * T], state, tables)
            yield l0, n, y

    @torch.no_grad()
    def _conv_chunked(self, u: torch.Tensor) -> torch.Tensor:
        """:meth:`_conv_inference` block by block (:meth:`stream`): time linear in ``L``.

        Same output as the full-length FFT to float rounding; the full FFT's ``L log L`` becomes
        ``L (log T + N)``.
        """
        B, H, L = u.shape
        out = u.new_empty(B, H, L)
        for l0, n, y in self.stream(B, L, lambda dst, l0, n: _copy_tiled(dst, u[..., l0 : l0 + n]), u):
            out[..., l0 : l0 + n] = y[..., :n]
        return out

    @torch.no_grad()
    def _mix_inference(self, y: torch.Tensor) -> torch.Tensor:
        """Output 1x1 conv + GLU without autograd, over blocks of positions, written into ``y``."""
        H, L = y.shape[1], y.shape[2]
        w, b = self.output_linear.weight[:, :, 0], self.output_linear.bias[:, None]
        cols = max(1, self._budget() // (2 * H))
        for yb in y:
            for l0 in range(0, L, cols):
                z = torch.addmm(b, w, yb[:, l0 : l0 + cols])
                torch.mul(z[:H], z[H:].sigmoid_(), out=yb[:, l0 : l0 + cols])
        return y

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``u`` of shape (B, H, L) (or (B, L, H) if not ``transposed``)."""
        if not self.transposed:
            u = u.transpose(-1, -2)
        L = u.shape[-1]
        n = fft_length(2 * L)
        fast = not torch.is_grad_enabled() and not self.training
        with torch.autocast(u.device.type, enabled=False):
            u = u.to(self.D.dtype)
            if fast and L >= 16 * self.chunk_len:
                y = self._conv_chunked(u)
            elif fast:
                y = self._conv_inference(u, self.kernel_fft(L, n) if self._cacheable(n) else None, n)
            else:
                y = self._conv_autograd(u.contiguous(), self.kernel_fft(L, n), n)
        if fast and not torch.is_autocast_enabled(y.device.type):
            y = self._mix_inference(y)
        else:
            z = torch.matmul(self.output_linear.weight[:, :, 0], self.dropout(y)) + self.output_linear.bias[:, None]
            y = F.glu(z, dim=-2)
        return y if self.transposed else y.transpose(-1, -2)
