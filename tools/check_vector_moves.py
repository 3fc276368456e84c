#!/usr/bin/env python3
"""Static check (issue 13): no full-width vector reload of a stack slot written by narrower stores.

Why: a vector load of W bytes whose bytes were written by several narrower stores cannot be
served by store-to-load forwarding; it waits until those stores have retired (a store-forwarding
stall, ~10-20 cycles each). GCC 12 under its generic tuning compiled the kernels' 32-byte block
loads (``std::memcpy`` into a vector-extension type) into two 16-byte loads, two 16-byte stores
to a stack slot and one 32-byte reload of that slot: every vector load of the AVX2 kernels
stalled, 5-10x slower than a plain ``vmovups``. The defect is invisible in tests (the bits are
right) and easy to bring back, so this script scans the machine code instead of timing it.

What is flagged, per function (symbols of an object file; in a stripped shared object, the
function ranges of its .eh_frame unwind table):
  a load of W bytes from a stack slot -- ``disp(%rsp)``, or ``disp(%rbp)`` in a function that
  sets up %rbp as its frame pointer; W is the destination register's width, 32 (ymm) or 64 (zmm),
  with ``--xmm`` also 16 (xmm, the SSE2 build's full width); the load is a plain vector move or a
  packed arithmetic instruction -- such that, on some path leading to it (the control-flow graph
  of the function's direct jumps, followed back at most _WINDOW instructions), the loaded bytes
  were all written by stores of which at least one is a vector-register store narrower than W
  (the value was assembled in the slot from pieces); or such that a vector-register store
  narrower than W with a variable index (``disp(%rsp,%reg,s)``, a lane written by index) may
  have written into it.
Paths on which some loaded byte is never written are not reported (GCC reuses slots for other
variables along paths that cannot both execute). A same-width spill and reload is not flagged
(it forwards). Deterministic: it reads the disassembly only, no timing.

Usage: check_vector_moves.py [--xmm] [--max N] [--verbose] FILE...   (objdump from binutils)
       check_vector_moves.py --self-test   (known-answer functions, assembled with `as`)
FILE: object files or the built module, e.g.
  python tools/check_vector_moves.py "$(python -c 'import normkit._core as c; print(c.__file__)')"
Exit status: 0 when at most N (default 0) loads are flagged, 1 otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Tuple

_REG_WIDTH = {"xmm": 16, "ymm": 32, "zmm": 64}
# memory operand: disp(base) or disp(base,index,scale) with base %rsp or %rbp
_MEM = re.compile(r"(-?0x[0-9a-f]+|-?\d+)?\((%rsp|%rbp)(?:,(%\w+)(?:,(\d))?)?\)")
_VREG = re.compile(r"^%([xyz]mm)\d+$")
_INSN = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
_HEADER = re.compile(r"^([0-9a-f]+) <(.+)>:$")
_TARGET = re.compile(r"^([0-9a-f]+)\b")
_NO_FALLTHROUGH = ("jmp", "ret", "ud2", "hlt")
# Paths are followed back at most this many instructions from the load. The defect assembles a
# vector in a slot right before reloading it (the 16-byte halves of a copy: 3-6 instructions);
# a bound keeps long infeasible paths through loops, along which GCC reuses a slot for another
# variable, from being reported.
_WINDOW = 64
# Instructions that write their last (memory) operand and nothing else of interest.
_STORE = re.compile(r"^(v?mov\w*|v?extract\w+|v?pextr\w|vcvtps2ph|set\w+)$")

# Loads that read as many bytes as their destination register holds.
_FULL_LOAD = re.compile(
    r"^v?(mov(a|u)p[sd]|movdq[au](8|16|32|64)?|"
    r"(add|sub|mul|div|min|max|and|andn|or|xor)p[sd]|"
    r"p(add|sub|and|andn|or|xor|mull|cmpeq|cmpgt|max|min)[bwdq]?|pand|pandn|por|pxor)$"
)
# Stores whose width is fixed by the mnemonic, whatever register they name.
_STORE_WIDTH = {
    "movss": 4, "movd": 4, "extractps": 4, "pextrd": 4, "movl": 4,
    "movsd": 8, "movq": 8, "movlps": 8, "movlpd": 8, "movhps": 8, "movhpd": 8, "pextrq": 8,
    "pextrw": 2, "movw": 2, "movb": 1, "pextrb": 1,
    "extractf128": 16, "extracti128": 16, "extractf32x4": 16, "extracti32x4": 16,
    "extractf64x2": 16, "extracti64x2": 16, "extractf64x4": 32, "extracti64x4": 32,
    "extractf32x8": 32, "extracti32x8": 32, "cvtps2ph": 16,
}
_GPR_WIDTH = [(re.compile(r"^%r(\w\w|\d+)$"), 8), (re.compile(r"^%(e\w\w|r\d+d)$"), 4),
              (re.compile(r"^%(\w[xip]|r\d+w)$"), 2), (re.compile(r"^%(\w[lh]|r\d+b|[sd]il|[bs]pl)$"), 1)]


def _split_operands(text: str) -> List[str]:
    text = text.split("#", 1)[0].strip()
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _mem(op: str) -> Optional[Tuple[str, int, bool]]:
    m = _MEM.fullmatch(op)
    if not m:
        return None
    disp = int(m.group(1), 0) if m.group(1) else 0
    return m.group(2), disp, m.group(3) is not None


def _store_width(mnemonic: str, ops: List[str]) -> int:
    base = mnemonic[1:] if mnemonic.startswith("v") and mnemonic[1:] in _STORE_WIDTH else mnemonic
    if base in _STORE_WIDTH:
        return _STORE_WIDTH[base]
    for op in ops[:-1]:
        m = _VREG.match(op)
        if m:
            return _REG_WIDTH[m.group(1)]
        for pat, w in _GPR_WIDTH:
            if pat.match(op):
                return w
    return 8  # immediate stores etc.: assume a scalar


class Function:
    def __init__(self, name: str):
        self.name = name
        # every instruction, in address order: (addr, mnemonic, jump target or None, store or None)
        # with store = (base, lo, hi, text)
        self.insns: List[Tuple[int, str, Optional[int], Optional[Tuple[str, int, int, str]]]] = []
        self.loads: List[Tuple[int, str, int, int, str]] = []  # (index, base, lo, width, text)
        self.rbp_frame = False  # %rbp holds the frame (mov %rsp,%rbp seen), not just any pointer


def _objdump(path: str, *args: str) -> str:
    return subprocess.run(["objdump", *args, path], check=True, capture_output=True,
                          text=True).stdout


def _fde_ranges(path: str) -> List[Tuple[int, int]]:
    ranges = []
    for m in re.finditer(r"FDE cie=\w+ pc=([0-9a-f]+)\.\.([0-9a-f]+)", _objdump(path, "--dwarf=frames")):
        ranges.append((int(m.group(1), 16), int(m.group(2), 16)))
    return sorted(ranges)


def _functions(path: str, widths: Tuple[int, ...]) -> Iterator[Function]:
    text = _objdump(path, "-d", "--no-show-raw-insn", "-C")
    relocatable = " file format " in text and _is_relocatable(path)
    ranges = [] if relocatable else _fde_ranges(path)
    ri = 0
    fn: Optional[Function] = None
    fn_end = -1
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h and (relocatable or not ranges):
            if fn:
                yield fn
            fn = Function(h.group(2))
            continue
        m = _INSN.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        if ranges:
            if fn is None or addr >= fn_end:
                while ri < len(ranges) and ranges[ri][1] <= addr:
                    ri += 1
                if fn:
                    yield fn
                if ri < len(ranges) and ranges[ri][0] <= addr:
                    fn, fn_end = Function(f"0x{ranges[ri][0]:x}"), ranges[ri][1]
                else:
                    fn, fn_end = Function(f"0x{addr:x} (no unwind entry)"), addr + 1
        if fn is None:
            fn = Function("?")
        mnemonic, ops = m.group(2), _split_operands(m.group(3))
        if mnemonic.startswith("mov") and ops == ["%rsp", "%rbp"]:
            fn.rbp_frame = True
        target = None
        if mnemonic.startswith("j"):
            t = _TARGET.match(m.group(3))
            if t:
                target = int(t.group(1), 16)
        store = None
        where = f"{addr:x}: {mnemonic} {m.group(3).split('#', 1)[0].strip()}"
        dst = _mem(ops[-1]) if len(ops) >= 2 and _STORE.match(mnemonic) else None
        if dst is not None:
            base, disp, indexed = dst
            from_vector = any(_VREG.match(op) for op in ops[:-1])
            width = _store_width(mnemonic, ops)
            if indexed:  # somewhere in [disp, disp + 64): covers nothing for sure
                store = (base, disp, disp + 64, where + " [indexed]", from_vector, width)
            else:
                store = (base, disp, disp + width, where, from_vector, width)
        fn.insns.append((addr, mnemonic, target, store))
        if dst is None and len(ops) >= 2:
            vd = _VREG.match(ops[-1])
            if vd and _REG_WIDTH[vd.group(1)] in widths and _FULL_LOAD.match(mnemonic):
                for op in ops[:-1]:
                    src = _mem(op)
                    if src is not None and not src[2]:
                        fn.loads.append((len(fn.insns) - 1, src[0], src[1],
                                         _REG_WIDTH[vd.group(1)], where))
    if fn:
        yield fn


def _is_relocatable(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(18)
    return len(head) == 18 and head[:4] == b"\x7fELF" and int.from_bytes(head[16:18], "little") == 1


def _narrow_reaching_store(fn: Function, load) -> Optional[str]:
    """A narrower vector store that, with the other stores found on some path backwards from the
    load, writes every byte of the loaded range (the value is assembled in the slot from pieces),
    or one that writes a lane at a variable index; None if there is none. Paths on which some
    byte is never written (slot reuse by another variable, or an infeasible path) are not
    flagged."""
    index, base, lo, width, _ = load
    insns = fn.insns
    addr_index = {a: i for i, (a, _, _, _) in enumerate(insns)}
    starts = {0}
    preds: Dict[int, List[int]] = defaultdict(list)  # block start index -> predecessor end indices
    for i, (_, mn, target, _) in enumerate(insns):
        if target is not None and target in addr_index:
            starts.add(addr_index[target])
            preds[addr_index[target]].append(i)
        if mn.startswith("j") or mn.startswith("ret"):
            starts.add(i + 1)
    for i in range(1, len(insns)):
        if i in starts and not insns[i - 1][1].startswith(_NO_FALLTHROUGH):
            preds[i].append(i - 1)
    full = (1 << width) - 1
    seen = set()
    # (instruction index to scan back from, bytes already covered, a narrower vector store seen)
    work = [(index, 0, None, 0)]  # the load itself writes nothing; its block may start there
    steps = 0
    while work and steps < 200000:
        i, covered, narrow, depth = work.pop()
        while i >= 0 and depth < _WINDOW:
            steps += 1
            depth += 1
            st = insns[i][3]
            if st is not None and st[0] == base and st[1] < lo + width and lo < st[2]:
                if st[3].endswith("[indexed]"):
                    if st[4] and st[5] < width:
                        return st[3]  # a lane written by a variable index, then the whole vector
                else:
                    a, b = max(st[1], lo) - lo, min(st[2], lo + width) - lo
                    mask = ((1 << (b - a)) - 1) << a
                    if mask & ~covered:
                        if st[5] < width and st[4] and narrow is None:
                            narrow = st[3]
                        covered |= mask
                    if covered == full:
                        if narrow is not None:
                            return narrow
                        break
            if i in starts:
                for p in preds.get(i, ()):
                    if (p, covered, narrow) not in seen:
                        seen.add((p, covered, narrow))
                        work.append((p, covered, narrow, depth))
                break
            i -= 1
    return None


def scan(path: str, widths: Tuple[int, ...]) -> List[Tuple[str, str, str]]:
    """(function, load, one narrower store) for every flagged load in the file."""
    flagged = []
    for fn in _functions(path, widths):
        for load in fn.loads:
            if load[1] == "%rbp" and not fn.rbp_frame:
                continue  # %rbp used as an ordinary register (no frame pointer): not the stack
            store = _narrow_reaching_store(fn, load)
            if store is not None:
                flagged.append((fn.name, load[4], store))
    return flagged


# Self-test: hand-written functions with a known answer, assembled with binutils' `as`, so that a
# change in objdump's output format cannot silently turn the check into one that passes anything.
_SELF_TEST = {
    # the GCC 12 memcpy split: two 16-byte stores, one 32-byte reload
    "split_copy": (1, """
        vmovdqu (%rdi), %xmm0
        vmovdqu 16(%rdi), %xmm1
        vmovdqa %xmm0, 32(%rsp)
        vmovdqa %xmm1, 48(%rsp)
        vmovapd 32(%rsp), %ymm2
        vaddpd 64(%rsp), %ymm2, %ymm2
        ret"""),
    # the same, folded into an addition, on a loop back edge
    "split_in_loop": (1, """
    1:  vaddpd 96(%rsp), %ymm3, %ymm3
        vmovdqa %xmm0, 96(%rsp)
        vmovdqa %xmm1, 112(%rsp)
        dec %rcx
        jnz 1b
        ret"""),
    # a lane written by a variable index, then the whole vector
    "indexed_lane": (1, """
        vmovapd %ymm0, 64(%rsp)
        vmovsd %xmm1, 64(%rsp,%rax,8)
        vmovapd 64(%rsp), %ymm2
        ret"""),
    # 64-byte reload of a slot written by two 32-byte stores (AVX-512)
    "zmm_from_ymm": (1, """
        vmovupd %ymm0, (%rsp)
        vmovupd %ymm1, 32(%rsp)
        vmovupd (%rsp), %zmm2
        ret"""),
    # a same-width spill and reload forwards: fine
    "spill": (0, """
        vmovapd %ymm0, 32(%rsp)
        call *%rax
        vmovapd 32(%rsp), %ymm0
        ret"""),
    # the slot held a scalar on another path only, or the load is wider than what a path wrote
    "slot_reuse": (0, """
        test %rdi, %rdi
        je 1f
        vmovss %xmm0, 32(%rsp)
        vmovss 32(%rsp), %xmm1
        ret
    1:  vmovapd %ymm0, 32(%rsp)
        vaddpd 32(%rsp), %ymm1, %ymm1
        ret"""),
}


def self_test() -> int:
    import os
    import tempfile

    if shutil.which("as") is None:
        print("check_vector_moves: the self-test needs `as` (binutils)", file=sys.stderr)
        return 2
    src = ["\t.text"]
    for name, (_, body) in _SELF_TEST.items():
        src += [f"\t.globl {name}", f"\t.type {name}, @function", f"{name}:", body,
                f"\t.size {name}, .-{name}"]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        s_path, o_path = os.path.join(tmp, "t.s"), os.path.join(tmp, "t.o")
        with open(s_path, "w") as f:
            f.write("\n".join(src) + "\n")
        subprocess.run(["as", "--64", "-o", o_path, s_path], check=True)
        got: Dict[str, int] = defaultdict(int)
        for fn, _, _ in scan(o_path, (32, 64)):
            got[fn] += 1
    for name, (want, _) in _SELF_TEST.items():
        ok = got.get(name, 0) == want
        failures += not ok
        print(f"check_vector_moves self-test: {name}: {got.get(name, 0)} flagged, expected {want}"
              f"{'' if ok else '  <-- WRONG'}")
    print(f"check_vector_moves self-test: {'OK' if not failures else 'FAILED'}")
    return 0 if not failures else 1


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help="object files or shared objects")
    ap.add_argument("--self-test", action="store_true",
                    help="scan hand-written functions with known answers (needs `as`), then exit")
    ap.add_argument("--xmm", action="store_true",
                    help="also flag 16-byte (xmm) reloads: the SSE2 build's full width")
    ap.add_argument("--max", type=int, default=0, help="flagged loads allowed (default 0)")
    ap.add_argument("--verbose", "-v", action="store_true", help="list every flagged load")
    args = ap.parse_args(argv)
    if shutil.which("objdump") is None:
        print("check_vector_moves: objdump (binutils) not found", file=sys.stderr)
        return 2
    if args.self_test:
        return self_test()
    if not args.files:
        ap.error("no files given")
    widths = (16, 32, 64) if args.xmm else (32, 64)
    total = 0
    for path in args.files:
        flagged = scan(path, widths)
        total += len(flagged)
        fns = len({f for f, _, _ in flagged})
        print(f"check_vector_moves: {path}: {len(flagged)} vector reloads of stack slots written "
              f"by narrower stores, in {fns} functions")
        shown = flagged if args.verbose else flagged[:5]
        for fn, load, store in shown:
            print(f"  in {fn}\n    load  {load}\n    after {store}")
        if len(flagged) > len(shown):
            print(f"  ... {len(flagged) - len(shown)} more (--verbose lists them)")
    ok = total <= args.max
    print(f"check_vector_moves: {'OK' if ok else 'FAILED'}: {total} flagged (at most {args.max} allowed)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
