"""Tensor ops shared by several methods (merge/unmerge, gather/compaction, attention with a size
bias, ...): each op a plain-torch reference and a Triton version behind one dispatcher.

No op lives here yet; ToMe's merge currently runs on the torch reference in
``accel.patches.tome.merge``.
"""
