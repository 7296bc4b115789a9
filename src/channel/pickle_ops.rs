//! The opcodes of a "plain" pickle: what the C pickler writes for dicts, lists, tuples, the
//! scalars of [`tinypickle`](super::tinypickle), references to module-level classes and
//! functions, and instances rebuilt by `__reduce__`/`NEWOBJ` and `BUILD`.
//!
//! A spawned child receives its preparation data and its process object as two such pickles.
//! Loading them with `_pickle` costs that child the import of `_pickle` itself, which imports
//! `functools` and through it `collections` (about 4 ms of a ~20 ms child start here), unless
//! the program imports them anyway. [`scan`] checks that one pickle uses only these opcodes and
//! lists them with their operands; `py::plainpickle` runs the list. Anything else (another
//! opcode, a `LONG1` past 64 bits, invalid UTF-8, malformed bytes) makes [`scan`] return `None`
//! before anything has run, and the caller loads the pickle with `_pickle` as before.

use super::tinypickle::{
    self as tp, Input, BINBYTES, BINBYTES8, BINFLOAT, BININT, BININT1, BININT2, BINPUT, BINUNICODE,
    BINUNICODE8, EMPTY_TUPLE, FRAME, LONG1, LONG_BINPUT, MARK, MEMOIZE, NEWFALSE, NEWTRUE, NONE,
    PROTO, SHORT_BINBYTES, SHORT_BINUNICODE, STOP, TUPLE, TUPLE1, TUPLE2, TUPLE3,
};

const EMPTY_DICT: u8 = b'}';
const EMPTY_LIST: u8 = b']';
const SETITEM: u8 = b's';
const SETITEMS: u8 = b'u';
const APPEND: u8 = b'a';
const APPENDS: u8 = b'e';
const BINGET: u8 = b'h';
const LONG_BINGET: u8 = b'j';
const STACK_GLOBAL: u8 = 0x93;
const REDUCE: u8 = b'R';
const NEWOBJ: u8 = 0x81;
const BUILD: u8 = b'b';

/// One instruction of a plain pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum Op<'a> {
    /// Push a mark.
    Mark,
    /// Push `{}`.
    EmptyDict,
    /// Push `[]`.
    EmptyList,
    /// Replace the top `n` (0 to 3) items with a tuple of them.
    Tuple(usize),
    /// Replace the items above the last mark with a tuple of them.
    TupleFromMark,
    /// Pop a value and a key; set it on the mapping below.
    SetItem,
    /// Pop the key/value pairs above the last mark; set them on the mapping below.
    SetItems,
    /// Pop a value; append it to the list below.
    Append,
    /// Pop the items above the last mark; extend the list below with them.
    Appends,
    /// Push a scalar.
    Atom(tp::Atom<'a>),
    /// Store the top in the next memo slot.
    Memoize,
    /// Store the top in memo slot `n`.
    Put(usize),
    /// Push memo slot `n`.
    Get(usize),
    /// Pop a name and a module name; push the object they name.
    StackGlobal,
    /// Pop an argument tuple and a callable; push the call's result.
    Reduce,
    /// Pop an argument tuple and a class; push `cls.__new__(cls, *args)`.
    NewObj,
    /// Pop a state; apply it to the object below (`__setstate__` or its `__dict__`).
    Build,
}

/// The instructions of the pickle that starts at `pos` in `buf` (through its STOP, which is
/// left out) and the position just past it; `None` if it is not a plain pickle.
pub fn scan(buf: &[u8], pos: usize) -> Option<(Vec<Op<'_>>, usize)> {
    let mut inp = Input { buf, pos };
    if inp.byte()? != PROTO || !(2..=5).contains(&inp.byte()?) {
        return None;
    }
    let mut ops = Vec::new();
    // Protocol 4 memoizes implicitly, older ones by index; a pickle mixing both is not
    // something the C pickler writes.
    let (mut implicit, mut indexed) = (false, false);
    loop {
        let op = match inp.byte()? {
            STOP => break,
            FRAME => {
                inp.take(8)?;
                continue;
            }
            MARK => Op::Mark,
            EMPTY_DICT => Op::EmptyDict,
            EMPTY_LIST => Op::EmptyList,
            EMPTY_TUPLE => Op::Tuple(0),
            op @ (TUPLE1 | TUPLE2 | TUPLE3) => Op::Tuple(usize::from(op - TUPLE1) + 1),
            TUPLE => Op::TupleFromMark,
            SETITEM => Op::SetItem,
            SETITEMS => Op::SetItems,
            APPEND => Op::Append,
            APPENDS => Op::Appends,
            NONE => Op::Atom(tp::Atom::None),
            NEWTRUE => Op::Atom(tp::Atom::Bool(true)),
            NEWFALSE => Op::Atom(tp::Atom::Bool(false)),
            BININT1 => Op::Atom(tp::Atom::Int(i64::from(inp.byte()?))),
            BININT2 => Op::Atom(tp::Atom::Int(i64::from(u16::from_le_bytes(inp.array()?)))),
            BININT => Op::Atom(tp::Atom::Int(i64::from(i32::from_le_bytes(inp.array()?)))),
            LONG1 => Op::Atom(tp::Atom::Int(tp::long1(&mut inp)?)),
            BINFLOAT => Op::Atom(tp::Atom::Float(f64::from_be_bytes(inp.array()?))),
            SHORT_BINUNICODE => {
                let n = usize::from(inp.byte()?);
                Op::Atom(tp::Atom::Str(std::str::from_utf8(inp.take(n)?).ok()?))
            }
            BINUNICODE => {
                let n = inp.len_u32()?;
                Op::Atom(tp::Atom::Str(std::str::from_utf8(inp.take(n)?).ok()?))
            }
            BINUNICODE8 => {
                let n = inp.len_u64()?;
                Op::Atom(tp::Atom::Str(std::str::from_utf8(inp.take(n)?).ok()?))
            }
            SHORT_BINBYTES => {
                let n = usize::from(inp.byte()?);
                Op::Atom(tp::Atom::Bytes(inp.take(n)?))
            }
            BINBYTES => {
                let n = inp.len_u32()?;
                Op::Atom(tp::Atom::Bytes(inp.take(n)?))
            }
            BINBYTES8 => {
                let n = inp.len_u64()?;
                Op::Atom(tp::Atom::Bytes(inp.take(n)?))
            }
            MEMOIZE => {
                implicit = true;
                Op::Memoize
            }
            op @ (BINPUT | LONG_BINPUT) => {
                indexed = true;
                let at = if op == BINPUT {
                    usize::from(inp.byte()?)
                } else {
                    inp.len_u32()?
                };
                // The C pickler numbers memo slots from 0, one per stored object: a larger
                // index would only make the loader allocate a sparse memo.
                if at > ops.len() {
                    return None;
                }
                Op::Put(at)
            }
            BINGET => Op::Get(usize::from(inp.byte()?)),
            LONG_BINGET => Op::Get(inp.len_u32()?),
            STACK_GLOBAL => Op::StackGlobal,
            REDUCE => Op::Reduce,
            NEWOBJ => Op::NewObj,
            BUILD => Op::Build,
            _ => return None,
        };
        ops.push(op);
    }
    (!(implicit && indexed)).then_some((ops, inp.pos))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..96), pos in 0usize..8) {
            let mut buf = vec![PROTO, 4];
            buf.extend(bytes);
            if let Some((_, end)) = scan(&buf, pos) {
                prop_assert!(end <= buf.len());
            }
        }
    }

    /// `{'a': [1, ('x', None)], 'k': <STACK_GLOBAL m.f>}` as protocol 4, framed, memoized.
    const PLAIN: &[u8] = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94]\x94(K\x01\x8c\x01x\x94N\x86\x94e\x8c\x01k\x94\x8c\x01m\x94\x8c\x01f\x94\x93\x94u.";

    #[test]
    fn scans_a_plain_pickle_and_finds_its_end() {
        let mut buf = PLAIN.to_vec();
        buf.extend_from_slice(b"trailing");
        let (ops, end) = scan(&buf, 0).expect("plain");
        assert_eq!(end, PLAIN.len());
        assert_eq!(ops.first(), Some(&Op::EmptyDict));
        assert!(ops.contains(&Op::StackGlobal));
        assert!(ops.contains(&Op::Atom(tp::Atom::Str("x"))));
        assert_eq!(ops.last(), Some(&Op::SetItems));
    }

    #[test]
    fn other_opcodes_and_truncation_are_refused() {
        // EMPTY_SET is valid pickle but not in the plain subset.
        assert_eq!(scan(b"\x80\x04\x8f.", 0), None);
        for cut in 0..PLAIN.len() {
            assert_eq!(scan(&PLAIN[..cut], 0), None, "cut at {cut}");
        }
        // A LONG1 past 64 bits.
        assert_eq!(
            scan(b"\x80\x04\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.", 0),
            None
        );
        // Implicit and indexed memo writes mixed.
        assert_eq!(scan(b"\x80\x04N\x94Nq\x01\x86.", 0), None);
        // A memo index no pickler would write (the loader would allocate 4 G slots).
        assert_eq!(scan(b"\x80\x02Nr\xff\xff\xff\xff.", 0), None);
        assert!(scan(b"\x80\x02Nq\x00.", 0).is_some());
    }
}
