#!/usr/bin/env python3
"""An independent RFC 9162 proof verifier, written only from the RFC's algorithm text
(sections 2.1.3.2 and 2.1.4.2), to check the proofs Trellis's transparency log serves
against something that shares no code with it.

    rfc9162.py self-test
    rfc9162.py inclusion  LEAF_INDEX TREE_SIZE LEAF_HASH_B64 ROOT_B64 PROOF_B64...
    rfc9162.py consistency FIRST SECOND FIRST_ROOT_B64 SECOND_ROOT_B64 PROOF_B64...

Exit 0 = verified, 1 = refused.
"""
import base64
import hashlib
import sys


def node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def verify_inclusion(leaf_index, tree_size, leaf_hash, inclusion_path, root_hash):
    # 2.1.3.2 step 1
    if leaf_index >= tree_size:
        return False
    # step 2, 3
    fn, sn = leaf_index, tree_size - 1
    r = leaf_hash
    # step 4
    for p in inclusion_path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node(p, r)
            if not fn & 1:
                while not (fn & 1) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    # step 5
    return sn == 0 and r == root_hash


def verify_consistency(first, second, first_hash, second_hash, consistency_path):
    if first == second:
        return not consistency_path and first_hash == second_hash
    if first == 0:
        return not consistency_path
    if first > second:
        return False
    path = list(consistency_path)
    # 2.1.4.2 step 1
    if not path:
        return False
    # step 2
    if first & (first - 1) == 0:
        path.insert(0, first_hash)
    # step 3
    fn, sn = first - 1, second - 1
    # step 4
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # step 5
    fr = sr = path[0]
    # step 6
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node(c, fr)
            sr = node(c, sr)
            if not fn & 1:
                while not (fn & 1) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node(sr, c)
        fn >>= 1
        sn >>= 1
    # step 7
    return fr == first_hash and sr == second_hash and sn == 0


def check(ok, what):
    # Not `assert`: python3 -O (or PYTHONOPTIMIZE) would strip it and pass a broken verifier.
    if not ok:
        print("rfc9162 self-test: FAILED: " + what, file=sys.stderr)
        sys.exit(1)


def self_test():
    # Certificate Transparency's reference leaves and published root / proofs.
    leaves = [bytes.fromhex(h) for h in (
        "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
        "606162636465666768696a6b6c6d6e6f")]
    h = bytes.fromhex
    root8 = h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")
    root6 = h("76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef")
    path0 = [h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
             h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
             h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")]
    check(verify_inclusion(0, 8, leaf(leaves[0]), path0, root8), "inclusion of leaf 0 in 8")
    check(not verify_inclusion(1, 8, leaf(leaves[0]), path0, root8), "leaf 0's proof refused at index 1")
    cons68 = [h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
              h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
              h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]
    check(verify_consistency(6, 8, root6, root8, cons68), "consistency 6 -> 8")
    check(not verify_consistency(6, 8, root8, root8, cons68), "consistency 6 -> 8 refused with a wrong first root")
    print("rfc9162 self-test: ok")


def main(argv):
    b64 = base64.b64decode
    if argv[:1] == ["self-test"]:
        self_test()
        return 0
    if argv[:1] == ["inclusion"] and len(argv) >= 5:
        ok = verify_inclusion(int(argv[1]), int(argv[2]), b64(argv[3]), [b64(p) for p in argv[5:]], b64(argv[4]))
    elif argv[:1] == ["consistency"] and len(argv) >= 5:
        ok = verify_consistency(int(argv[1]), int(argv[2]), b64(argv[3]), b64(argv[4]), [b64(p) for p in argv[5:]])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print("verified" if ok else "refused")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
