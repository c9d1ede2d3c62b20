"""The quantization room: int8 primitives, int8 layers, the one float -> int8 table, and conversion.

* :mod:`~lightning_compress.core.quant.primitives`: scales, quantize / dequantize, observers;
* :mod:`~lightning_compress.core.quant.modules`: ``Int8Linear``, ``Int8Conv2d`` and their base (re-exported
  from :mod:`~lightning_compress.core.quant.conv2d` and :mod:`~lightning_compress.core.quant.base`);
* :mod:`~lightning_compress.core.quant.kernels`: how an ``Int8Linear`` computes on this machine (CPU and
  fbgemm probing in :mod:`~lightning_compress.core.quant.fbgemm`);
* :mod:`~lightning_compress.core.quant.table`: ``{float type: int8 type}``, asked by everything else;
* :mod:`~lightning_compress.core.quant.transformer`: int8-aware ``MultiheadAttention`` / encoder layers;
* :mod:`~lightning_compress.core.quant.convert`: picking layers, calibrating and swapping them in place.
"""
