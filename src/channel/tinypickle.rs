//! A native encoder and decoder for the small subset of pickle protocol 5 that most queue
//! messages use: `None`, `bool`, 64-bit `int`, `float`, `str`, `bytes` and tuples of them.
//!
//! The C pickler handles exactly these builtin types before it looks at any dispatch table or
//! `copyreg` entry, so encoding them here gives the same objects back as `ForkingPickler` would.
//! Messages in this subset skip the Python-level pickler entirely; anything else goes through
//! it as before. [`encode`] writes a valid pickle that `pickle.loads` reads. [`decode`]
//! recognizes the same subset in pickles written by this module or by the C pickler (framing
//! and memo *writes* included) and returns `None` for everything else: an opcode outside the
//! subset, a memo *read* (it would share one object between two places), invalid UTF-8, too
//! deep a nesting, or malformed bytes. The caller then hands the bytes to `pickle.loads`,
//! which gives the real answer or the real error. The decoder never panics and never
//! allocates more than the message's own length suggests.

pub(crate) const PROTO: u8 = 0x80;
pub(crate) const FRAME: u8 = 0x95;
pub(crate) const STOP: u8 = b'.';
pub(crate) const NONE: u8 = b'N';
pub(crate) const NEWTRUE: u8 = 0x88;
pub(crate) const NEWFALSE: u8 = 0x89;
pub(crate) const BININT1: u8 = b'K';
pub(crate) const BININT2: u8 = b'M';
pub(crate) const BININT: u8 = b'J';
pub(crate) const LONG1: u8 = 0x8a;
pub(crate) const BINFLOAT: u8 = b'G';
pub(crate) const SHORT_BINUNICODE: u8 = 0x8c;
pub(crate) const BINUNICODE: u8 = b'X';
pub(crate) const BINUNICODE8: u8 = 0x8d;
pub(crate) const SHORT_BINBYTES: u8 = b'C';
pub(crate) const BINBYTES: u8 = b'B';
pub(crate) const BINBYTES8: u8 = 0x8e;
pub(crate) const EMPTY_TUPLE: u8 = b')';
pub(crate) const TUPLE1: u8 = 0x85;
pub(crate) const TUPLE2: u8 = 0x86;
pub(crate) const TUPLE3: u8 = 0x87;
pub(crate) const MARK: u8 = b'(';
pub(crate) const TUPLE: u8 = b't';
pub(crate) const MEMOIZE: u8 = 0x94;
pub(crate) const BINPUT: u8 = b'q';
pub(crate) const LONG_BINPUT: u8 = b'r';

/// Deepest tuple nesting either side accepts.
pub const MAX_DEPTH: usize = 16;

/// One value of the subset. Strings and bytes borrow from the message being decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Atom<'a> {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An `int` that fits in 64 bits.
    Int(i64),
    /// A `float` (compared bit for bit by the tests, so NaN round-trips too).
    Float(f64),
    /// A `str` without lone surrogates.
    Str(&'a str),
    /// A `bytes`.
    Bytes(&'a [u8]),
    /// A `tuple`.
    Tuple(Vec<Atom<'a>>),
}

/// Appends the pickle of `atom` (protocol header through STOP) to `out`.
pub fn encode(atom: &Atom<'_>, out: &mut Vec<u8>) {
    begin(out);
    encode_value(atom, out);
    end(out);
}

fn encode_value(atom: &Atom<'_>, out: &mut Vec<u8>) {
    match atom {
        Atom::None => none(out),
        Atom::Bool(b) => boolean(*b, out),
        Atom::Int(v) => int(*v, out),
        Atom::Float(f) => float(*f, out),
        Atom::Str(s) => string(s, out),
        Atom::Bytes(b) => bytes(b, out),
        Atom::Tuple(items) => {
            tuple_start(items.len(), out);
            for item in items {
                encode_value(item, out);
            }
            tuple_end(items.len(), out);
        }
    }
}

// The writer, one call per value, for encoders that walk their own object graph (a tuple is
// `tuple_start`, its items, `tuple_end`, with the same length both times).

/// Starts a message: the protocol 5 header.
pub fn begin(out: &mut Vec<u8>) {
    out.extend_from_slice(&[PROTO, 5]);
}

/// Ends a message.
pub fn end(out: &mut Vec<u8>) {
    out.push(STOP);
}

/// Writes `None`.
pub fn none(out: &mut Vec<u8>) {
    out.push(NONE);
}

/// Writes a `bool`.
pub fn boolean(b: bool, out: &mut Vec<u8>) {
    out.push(if b { NEWTRUE } else { NEWFALSE });
}

/// Writes a `float`.
pub fn float(f: f64, out: &mut Vec<u8>) {
    out.push(BINFLOAT);
    out.extend_from_slice(&f.to_be_bytes());
}

/// Writes a `str`.
pub fn string(s: &str, out: &mut Vec<u8>) {
    encode_sized(s.as_bytes(), SHORT_BINUNICODE, BINUNICODE, BINUNICODE8, out);
}

/// Writes a `bytes`.
pub fn bytes(b: &[u8], out: &mut Vec<u8>) {
    encode_sized(b, SHORT_BINBYTES, BINBYTES, BINBYTES8, out);
}

/// Opens a tuple of `len` items.
pub fn tuple_start(len: usize, out: &mut Vec<u8>) {
    if len > 3 {
        out.push(MARK);
    }
}

/// Closes a tuple of `len` items.
pub fn tuple_end(len: usize, out: &mut Vec<u8>) {
    out.push(match len {
        0 => EMPTY_TUPLE,
        1 => TUPLE1,
        2 => TUPLE2,
        3 => TUPLE3,
        _ => TUPLE,
    });
}

/// Writes an `int`, as the C pickler does: the smallest of the unsigned 1- and 2-byte forms,
/// the signed 4-byte form, or LONG1 with the minimal little-endian two's complement.
pub fn int(v: i64, out: &mut Vec<u8>) {
    if let Ok(small) = u8::try_from(v) {
        out.extend_from_slice(&[BININT1, small]);
    } else if let Ok(mid) = u16::try_from(v) {
        out.push(BININT2);
        out.extend_from_slice(&mid.to_le_bytes());
    } else if let Ok(word) = i32::try_from(v) {
        out.push(BININT);
        out.extend_from_slice(&word.to_le_bytes());
    } else {
        let bytes = v.to_le_bytes();
        let mut n = bytes.len();
        // Drop redundant sign bytes: keep one whose top bit still carries the sign.
        while n > 1 {
            let (top, next) = (bytes[n - 1], bytes[n - 2]);
            let redundant = (top == 0 && next & 0x80 == 0) || (top == 0xff && next & 0x80 != 0);
            if !redundant {
                break;
            }
            n -= 1;
        }
        out.push(LONG1);
        // n <= 8.
        out.push(n as u8);
        out.extend_from_slice(&bytes[..n]);
    }
}

fn encode_sized(data: &[u8], short: u8, mid: u8, long: u8, out: &mut Vec<u8>) {
    let len = data.len();
    if let Ok(l) = u8::try_from(len) {
        out.extend_from_slice(&[short, l]);
    } else if let Ok(l) = u32::try_from(len) {
        out.push(mid);
        out.extend_from_slice(&l.to_le_bytes());
    } else {
        out.push(long);
        out.extend_from_slice(&(len as u64).to_le_bytes());
    }
    out.extend_from_slice(data);
}

/// A cursor over the message.
pub(crate) struct Input<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Input<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    pub(crate) fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|s| s.try_into().ok())
    }

    pub(crate) fn len_u32(&mut self) -> Option<usize> {
        usize::try_from(u32::from_le_bytes(self.array()?)).ok()
    }

    pub(crate) fn len_u64(&mut self) -> Option<usize> {
        usize::try_from(u64::from_le_bytes(self.array()?)).ok()
    }
}

/// The operand of a `LONG1` as an `i64`; `None` past 64 bits or the end of the input.
pub(crate) fn long1(inp: &mut Input<'_>) -> Option<i64> {
    let n = usize::from(inp.byte()?);
    if n > 8 {
        return None;
    }
    let bytes = inp.take(n)?;
    let mut word = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
        [0xff; 8]
    } else {
        [0; 8]
    };
    word[..n].copy_from_slice(bytes);
    Some(i64::from_le_bytes(word))
}

/// Decodes a whole message in the subset; `None` when it is anything else (see the module
/// documentation).
pub fn decode(buf: &[u8]) -> Option<Atom<'_>> {
    let mut inp = Input { buf, pos: 0 };
    if inp.byte()? != PROTO || !(2..=5).contains(&inp.byte()?) {
        return None;
    }
    let mut stack: Vec<Atom<'_>> = Vec::new();
    // The tuple nesting of each stack entry (0 for a scalar), and stack heights at each MARK.
    let mut depths: Vec<usize> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    loop {
        let op = inp.byte()?;
        let mut depth = 0;
        let atom = match op {
            STOP => {
                return (stack.len() == 1 && marks.is_empty() && inp.pos == buf.len())
                    .then(|| stack.pop())
                    .flatten();
            }
            FRAME => {
                // The frame length is advisory for a reader that already has every byte.
                inp.take(8)?;
                continue;
            }
            MEMOIZE => continue,
            BINPUT => {
                inp.take(1)?;
                continue;
            }
            LONG_BINPUT => {
                inp.take(4)?;
                continue;
            }
            MARK => {
                if marks.len() >= MAX_DEPTH {
                    return None;
                }
                marks.push(stack.len());
                continue;
            }
            NONE => Atom::None,
            NEWTRUE => Atom::Bool(true),
            NEWFALSE => Atom::Bool(false),
            BININT1 => Atom::Int(i64::from(inp.byte()?)),
            BININT2 => Atom::Int(i64::from(u16::from_le_bytes(inp.array()?))),
            BININT => Atom::Int(i64::from(i32::from_le_bytes(inp.array()?))),
            LONG1 => Atom::Int(long1(&mut inp)?),
            BINFLOAT => Atom::Float(f64::from_be_bytes(inp.array()?)),
            SHORT_BINUNICODE => {
                let n = usize::from(inp.byte()?);
                Atom::Str(std::str::from_utf8(inp.take(n)?).ok()?)
            }
            BINUNICODE => {
                let n = inp.len_u32()?;
                Atom::Str(std::str::from_utf8(inp.take(n)?).ok()?)
            }
            BINUNICODE8 => {
                let n = inp.len_u64()?;
                Atom::Str(std::str::from_utf8(inp.take(n)?).ok()?)
            }
            SHORT_BINBYTES => {
                let n = usize::from(inp.byte()?);
                Atom::Bytes(inp.take(n)?)
            }
            BINBYTES => {
                let n = inp.len_u32()?;
                Atom::Bytes(inp.take(n)?)
            }
            BINBYTES8 => {
                let n = inp.len_u64()?;
                Atom::Bytes(inp.take(n)?)
            }
            EMPTY_TUPLE => {
                depth = 1;
                Atom::Tuple(Vec::new())
            }
            TUPLE1 | TUPLE2 | TUPLE3 | TUPLE => {
                let start = if op == TUPLE {
                    marks.pop()?
                } else {
                    let floor = marks.last().copied().unwrap_or(0);
                    let n = usize::from(op - TUPLE1) + 1;
                    stack.len().checked_sub(n).filter(|s| *s >= floor)?
                };
                depth = 1 + depths.drain(start..).max().unwrap_or(0);
                if depth > MAX_DEPTH {
                    return None;
                }
                Atom::Tuple(stack.split_off(start))
            }
            _ => return None,
        };
        stack.push(atom);
        depths.push(depth);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn same(a: &Atom<'_>, b: &Atom<'_>) -> bool {
        match (a, b) {
            (Atom::Float(x), Atom::Float(y)) => x.to_bits() == y.to_bits(),
            (Atom::Tuple(x), Atom::Tuple(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
            }
            _ => a == b,
        }
    }

    #[test]
    fn matches_the_c_pickler_for_unframed_values() {
        // pickle.dumps(v, 5) for values whose pickle is shorter than a frame.
        let cases: &[(Atom<'_>, &[u8])] = &[
            (Atom::None, b"\x80\x05N."),
            (Atom::Bool(true), b"\x80\x05\x88."),
            (Atom::Int(7), b"\x80\x05K\x07."),
            (Atom::Tuple(vec![]), b"\x80\x05)."),
        ];
        for (atom, want) in cases {
            let mut out = Vec::new();
            encode(atom, &mut out);
            assert_eq!(&out[..], *want, "{atom:?}");
        }
    }

    #[test]
    fn reads_framed_and_memoized_c_pickles() {
        // pickle.dumps(("ab", 1000000), 5)
        let c = b"\x80\x05\x95\r\x00\x00\x00\x00\x00\x00\x00\x8c\x02ab\x94J@B\x0f\x00\x86\x94.";
        assert_eq!(
            decode(c),
            Some(Atom::Tuple(vec![Atom::Str("ab"), Atom::Int(1_000_000)]))
        );
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        // A memo read, a list, a truncated message, trailing bytes, bad UTF-8, no STOP.
        for bad in [
            &b"\x80\x05\x8c\x01a\x94h\x00\x86."[..],
            b"\x80\x05]\x94.",
            b"\x80\x05J\x01\x02",
            b"\x80\x05N.N",
            b"\x80\x05\x8c\x01\xff.",
            b"\x80\x05N",
            b"\x80\x05N\x85\x85\x86.",
            b"",
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn limits_nesting() {
        let mut msg = b"\x80\x05N".to_vec();
        msg.extend(std::iter::repeat_n(TUPLE1, MAX_DEPTH + 1));
        msg.push(STOP);
        assert_eq!(decode(&msg), None);
        msg.drain(2 + 1..2 + 2);
        assert!(decode(&msg).is_some());
    }

    fn atom_strategy() -> impl Strategy<Value = Atom<'static>> {
        let leaf = prop_oneof![
            Just(Atom::None),
            any::<bool>().prop_map(Atom::Bool),
            any::<i64>().prop_map(Atom::Int),
            (-70_000i64..70_000).prop_map(Atom::Int),
            any::<f64>().prop_map(Atom::Float),
            "[a-zé€😀]{0,300}".prop_map(|s| Atom::Str(Box::leak(s.into_boxed_str()))),
            proptest::collection::vec(any::<u8>(), 0..300)
                .prop_map(|v| Atom::Bytes(Box::leak(v.into_boxed_slice()))),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            proptest::collection::vec(inner, 0..6).prop_map(Atom::Tuple)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn round_trips(atom in atom_strategy()) {
            let mut out = Vec::new();
            encode(&atom, &mut out);
            let back = decode(&out).expect("decodes its own output");
            prop_assert!(same(&atom, &back), "{atom:?} -> {back:?}");
            // The spawn payload loader takes every pickle of this subset too.
            let scanned = crate::channel::pickle_ops::scan(&out, 0);
            prop_assert_eq!(scanned.map(|(_, end)| end), Some(out.len()));
        }

        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut msg = vec![PROTO, 5];
            msg.extend(bytes);
            let _ = decode(&msg);
        }

        #[test]
        fn never_panics_on_damaged_pickles(atom in atom_strategy(), at in any::<usize>(), to in any::<u8>()) {
            let mut out = Vec::new();
            encode(&atom, &mut out);
            let i = at % out.len();
            out[i] = to;
            let _ = decode(&out);
            out.truncate(i);
            prop_assert_eq!(decode(&out), None);
        }
    }
}
