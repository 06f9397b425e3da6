"""im2col: a convolution's input patches as the rows of a matrix, so a convolution becomes one matmul.

For an NCHW input and a KH x KW kernel, row r = (n, oh, ow) of the result holds the KH*KW*C input values
under that output pixel's window, ordered (kh, kw, c): channels innermost, so that when the input is
the previous convolution's output, still pixel-major before its transpose back to NCHW, the reads are contiguous; padding
reads as zero. It is a TE compute: under the build's CPU schedules its loops run in parallel and
vectorised, and the zero padding is inlined into it.
"""

from __future__ import annotations

__all__ = ["im2col"]


def im2col(data, *, kernel: tuple[int, int], strides: tuple[int, int], padding: tuple[int, int, int, int],
           dilation: tuple[int, int], out_size: tuple[int, int]):
    """[N*OH*OW, KH*KW*C] patches of `data` (a TE tensor, NCHW); `padding` is (top, left, bottom, right)."""
    from tvm import te, topi

    batch, channels = (int(d) for d in data.shape[:2])
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, strides, dilation, out_size
    top, left, bottom, right = padding
    padded = topi.nn.pad(data, [0, 0, top, left], [0, 0, bottom, right]) if any(padding) else data

    def patch(row, column):
        n, pixel = row // (oh * ow), row % (oh * ow)
        tap, c = column // channels, column % channels
        return padded[n, c, pixel // ow * sh + tap // kw * dh, pixel % ow * sw + tap % kw * dw]

    return te.compute((batch * oh * ow, kh * kw * channels), patch, name="im2col")
