"""The kept-number schedules DiffRate's search found for DeiT (Chen et al., ICCV 2023):
OpenGVLab/DiffRate's ``compression_rate.json`` ("ViT-T-DeiT", "ViT-S-DeiT", "ViT-B-DeiT"), by the GFLOPs
the schedule costs. Each is (prune kept numbers, merge kept numbers) per block, counts with [CLS], for
12 blocks (GFLOPs at 224², 197 tokens). ``reducer.schedule=2.3`` picks one for the DeiT it is bound to.
"""
from typing import Dict, List, Tuple

from accel.errors import UserInputError

Schedule = Tuple[List[int], List[int]]

#: DeiT width (embed_dim) → its name and {GFLOPs: (prune, merge)}.
DEIT_SCHEDULES: Dict[int, Tuple[str, Dict[float, Schedule]]] = {
    192: ("DeiT-T", {
        0.6: ([197, 196, 180, 157, 130, 107, 86, 73, 63, 51, 40, 3], [197, 187, 167, 139, 114, 90, 76, 66, 57, 45, 37, 3]),
        0.7: ([197, 196, 194, 180, 150, 123, 98, 82, 68, 60, 52, 3], [197, 196, 192, 158, 133, 103, 88, 72, 64, 58, 49, 3]),
        0.8: ([197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3], [197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3]),
        0.9: ([197, 197, 196, 190, 182, 166, 141, 125, 113, 105, 99, 3],
              [197, 196, 194, 188, 172, 147, 129, 115, 107, 103, 96, 3]),
        1.0: ([197, 197, 196, 194, 188, 184, 178, 164, 156, 137, 129, 21],
              [197, 197, 196, 190, 186, 154, 148, 156, 145, 135, 125, 21]),
    }),
    384: ("DeiT-S", {
        2.3: ([197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3], [197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3]),
        2.5: ([197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3], [197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3]),
        2.7: ([197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3], [197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3]),
        2.9: ([197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3], [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]),
        3.1: ([197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3],
              [197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3]),
    }),
    768: ("DeiT-B", {
        8.7: ([197, 192, 172, 156, 131, 107, 90, 72, 56, 33, 17, 3], [197, 178, 162, 141, 115, 96, 78, 60, 47, 21, 13, 3]),
        10.0: ([197, 194, 182, 168, 148, 129, 113, 101, 82, 49, 25, 3], [197, 186, 174, 156, 137, 117, 105, 90, 66, 31, 19, 3]),
        10.4: ([197, 196, 188, 174, 156, 141, 121, 103, 90, 58, 25, 3], [197, 190, 184, 164, 145, 131, 107, 94, 74, 31, 21, 3]),
        11.5: ([197, 197, 197, 188, 170, 154, 139, 123, 107, 72, 43, 3], [197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3]),
        12.5: ([197, 197, 196, 192, 184, 170, 154, 139, 129, 94, 58, 3], [197, 196, 194, 190, 176, 160, 145, 131, 115, 68, 47, 3]),
    }),
}


def authors_schedule(gflops: float, embed_dim: int, depth: int) -> Schedule:
    """The authors' schedule of ``gflops`` for the 12-block DeiT of this width; a UserInputError naming
    the schedules there are when this network has none of that name. The kept numbers are counts, so
    they also apply at other image sizes (a block keeps at most the tokens it has); the GFLOPs in the
    name are those at 224²."""
    offered = "; ".join(f"{name} (embed_dim {dim}): {', '.join(f'{g:g}' for g in table)}"
                        for dim, (name, table) in DEIT_SCHEDULES.items())
    name, table = DEIT_SCHEDULES.get(embed_dim, (None, {}))
    if depth != 12 or float(gflops) not in table:
        raise UserInputError(
            f"DiffRate schedule={gflops} on a ViT of embed_dim {embed_dim} with {depth} blocks: the authors' "
            f"searched schedules are for 12-block DeiTs — {offered} GFLOPs; expected "
            "one of those, or reducer.schedule=null with reducer.prune/reducer.merge lists, or reducer.search=true.")
    prune, merge = table[float(gflops)]
    return list(prune), list(merge)
