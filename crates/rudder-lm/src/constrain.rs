//! Constrained decoding: only tokens that keep the output a valid prefix of an allowed text may
//! be sampled. The one grammar here is JSON — any JSON object (`response_format: json_object`)
//! or a JSON schema (`response_format: json_schema`) — run as a byte-level pushdown automaton
//! over the tokens' raw bytes. A trie of the vocabulary turns the automaton into a mask per step
//! (each shared token prefix is checked once); greedy decoding instead checks candidates one by
//! one from the most likely down, which usually stops at the first.
//!
//! Schema keywords honoured: `type` (one or a list), `properties` (generated in schema order;
//! optional ones may be skipped), `required`, `items`, `minItems`, `maxItems`, `enum`, `const`,
//! `anyOf`/`oneOf` (alternatives must start with different characters, e.g. a string or null),
//! `allOf` with one member, `minLength`, `maxLength`, `$ref` to `#/$defs/…` or
//! `#/definitions/…` (recursion allowed). Not enforced: `pattern`, `format`, numeric bounds,
//! `additionalProperties` (no extra keys are ever generated). Whitespace between tokens is
//! capped per gap and numbers per digit count, so a model cannot loop on them forever.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::{LmError, Result};

type NodeId = u16;

#[derive(Clone, Debug)]
enum Node {
    /// Any JSON value.
    Any,
    /// An object with any keys and any values.
    AnyObject,
    Object {
        keys: Vec<Vec<u8>>,
        values: Vec<NodeId>,
        required: Vec<bool>,
    },
    Array {
        items: NodeId,
        min: u32,
        max: u32,
    },
    Str {
        min: u32,
        max: u32,
    },
    /// One of these exact texts (enum, const, booleans, null).
    Literals(Vec<Vec<u8>>),
    Number {
        integer: bool,
    },
    /// Alternatives told apart by their first byte.
    Union(Vec<NodeId>),
    /// A `$ref` not resolved yet (only during compilation).
    Pending,
}

const ANY: NodeId = 0;
const ANY_OBJECT: NodeId = 1;
const ANY_ARRAY: NodeId = 2;
const ANY_STR: NodeId = 3;
const ANY_NUM: NodeId = 4;
const ANY_LIT: NodeId = 5;

/// Whitespace allowed in one gap between two JSON tokens: one line break and this many spaces
/// or tabs (enough for indented output, too little for a model to loop on).
const MAX_WS: u8 = 8;
const MAX_INT_DIGITS: u8 = 16;
const MAX_FRAC_DIGITS: u8 = 12;
const MAX_EXP_DIGITS: u8 = 3;
const MAX_DEPTH: usize = 32;
const MAX_PROPS: usize = 64;

/// A compiled grammar: the root and the node table.
#[derive(Clone, Debug)]
pub struct JsonGrammar {
    nodes: Vec<Node>,
    root: NodeId,
}

fn schema_err(path: &str, msg: impl std::fmt::Display) -> LmError {
    LmError::Config(format!("response_format schema at {path}: {msg}"))
}

impl JsonGrammar {
    fn base() -> Vec<Node> {
        let lits = ["true", "false", "null"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        vec![
            Node::Any,
            Node::AnyObject,
            Node::Array {
                items: ANY,
                min: 0,
                max: u32::MAX,
            },
            Node::Str {
                min: 0,
                max: u32::MAX,
            },
            Node::Number { integer: false },
            Node::Literals(lits),
        ]
    }

    /// Any JSON object (OpenAI's `{"type": "json_object"}`).
    pub fn any_object() -> Self {
        JsonGrammar {
            nodes: Self::base(),
            root: ANY_OBJECT,
        }
    }

    /// Compile a JSON schema.
    pub fn from_schema(schema: &Value) -> Result<Self> {
        let mut c = Compiler {
            nodes: Self::base(),
            root: schema,
            refs: HashMap::new(),
        };
        let root = c.compile(schema, "#")?;
        let g = JsonGrammar {
            nodes: c.nodes,
            root,
        };
        g.check_unions()?;
        Ok(g)
    }

    /// Bytes a value of node `n` may start with (after whitespace).
    fn first_bytes(&self, n: NodeId, seen: &mut Vec<NodeId>) -> [bool; 256] {
        let mut out = [false; 256];
        if seen.contains(&n) {
            return out;
        }
        seen.push(n);
        let mut set = |bs: &[u8]| bs.iter().for_each(|&b| out[b as usize] = true);
        match &self.nodes[n as usize] {
            Node::Any => set(b"{[\"-0123456789tfn"),
            Node::AnyObject | Node::Object { .. } => set(b"{"),
            Node::Array { .. } => set(b"["),
            Node::Str { .. } => set(b"\""),
            Node::Number { .. } => set(b"-0123456789"),
            Node::Literals(l) => l.iter().filter_map(|x| x.first()).for_each(|&b| {
                out[b as usize] = true;
            }),
            Node::Union(alts) => {
                for &a in alts {
                    let f = self.first_bytes(a, seen);
                    for (o, x) in out.iter_mut().zip(f) {
                        *o |= x;
                    }
                }
            }
            Node::Pending => {}
        }
        out
    }

    fn check_unions(&self) -> Result<()> {
        for (i, n) in self.nodes.iter().enumerate() {
            if let Node::Union(alts) = n {
                let mut taken = [usize::MAX; 256];
                for (k, &a) in alts.iter().enumerate() {
                    let f = self.first_bytes(a, &mut Vec::new());
                    for b in 0..256 {
                        if f[b] {
                            if taken[b] != usize::MAX && taken[b] != k {
                                return Err(LmError::Config(format!(
                                    "response_format schema: anyOf/oneOf alternatives {} and {k} \
                                     (node {i}) can both start with {:?}; only alternatives of \
                                     different kinds (object, array, string, number, \
                                     true/false/null) are supported",
                                    taken[b], b as u8 as char
                                )));
                            }
                            taken[b] = k;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

struct Compiler<'a> {
    nodes: Vec<Node>,
    root: &'a Value,
    refs: HashMap<String, NodeId>,
}

impl Compiler<'_> {
    fn push(&mut self, n: Node, path: &str) -> Result<NodeId> {
        if self.nodes.len() >= u16::MAX as usize {
            return Err(schema_err(path, "schema too large"));
        }
        self.nodes.push(n);
        Ok((self.nodes.len() - 1) as NodeId)
    }

    fn literal(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap_or_default()
    }

    fn compile(&mut self, s: &Value, path: &str) -> Result<NodeId> {
        let obj = match s {
            Value::Bool(true) => return Ok(ANY),
            Value::Object(o) => o,
            _ => return Err(schema_err(path, "a schema must be an object or true")),
        };
        if let Some(r) = obj.get("$ref") {
            let r = r
                .as_str()
                .ok_or_else(|| schema_err(path, "$ref must be a string"))?;
            return self.resolve_ref(r, path);
        }
        if let Some(v) = obj.get("const") {
            return self.push(Node::Literals(vec![Self::literal(v)]), path);
        }
        if let Some(e) = obj.get("enum") {
            let e = e
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| schema_err(path, "enum must be a non-empty array"))?;
            if e.len() > MAX_PROPS {
                return Err(schema_err(
                    path,
                    format!("enum of more than {MAX_PROPS} values"),
                ));
            }
            return self.push(Node::Literals(e.iter().map(Self::literal).collect()), path);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = obj.get(key) {
                let alts = alts
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| schema_err(path, format!("{key} must be a non-empty array")))?;
                let ids = alts
                    .iter()
                    .enumerate()
                    .map(|(i, a)| self.compile(a, &format!("{path}/{key}/{i}")))
                    .collect::<Result<Vec<_>>>()?;
                return if ids.len() == 1 {
                    Ok(ids[0])
                } else {
                    self.push(Node::Union(ids), path)
                };
            }
        }
        if let Some(all) = obj.get("allOf") {
            match all.as_array().map(|a| a.as_slice()) {
                Some([one]) => return self.compile(one, &format!("{path}/allOf/0")),
                _ => return Err(schema_err(path, "allOf is supported with one member only")),
            }
        }
        let types: Vec<&str> = match obj.get("type") {
            None => Vec::new(),
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(|t| t.as_str()).collect(),
            Some(_) => return Err(schema_err(path, "type must be a string or a list")),
        };
        if types.is_empty() {
            if obj.contains_key("properties") {
                return self.compile_type("object", obj, path);
            }
            if obj.contains_key("items") {
                return self.compile_type("array", obj, path);
            }
            return Ok(ANY);
        }
        if types.len() == 1 {
            return self.compile_type(types[0], obj, path);
        }
        let ids = types
            .iter()
            .map(|t| self.compile_type(t, obj, path))
            .collect::<Result<Vec<_>>>()?;
        self.push(Node::Union(ids), path)
    }

    fn count(obj: &serde_json::Map<String, Value>, key: &str, default: u32) -> u32 {
        obj.get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v.min(u32::MAX as u64) as u32)
            .unwrap_or(default)
    }

    fn compile_type(
        &mut self,
        t: &str,
        obj: &serde_json::Map<String, Value>,
        path: &str,
    ) -> Result<NodeId> {
        match t {
            "string" => {
                let (min, max) = (
                    Self::count(obj, "minLength", 0),
                    Self::count(obj, "maxLength", u32::MAX),
                );
                if min > max {
                    return Err(schema_err(path, "minLength exceeds maxLength"));
                }
                self.push(Node::Str { min, max }, path)
            }
            "number" => Ok(ANY_NUM),
            "integer" => self.push(Node::Number { integer: true }, path),
            "boolean" => self.push(
                Node::Literals(vec![b"true".to_vec(), b"false".to_vec()]),
                path,
            ),
            "null" => self.push(Node::Literals(vec![b"null".to_vec()]), path),
            "array" => {
                let (min, max) = (
                    Self::count(obj, "minItems", 0),
                    Self::count(obj, "maxItems", u32::MAX),
                );
                if min > max {
                    return Err(schema_err(path, "minItems exceeds maxItems"));
                }
                let items = match obj.get("items") {
                    Some(it) => self.compile(it, &format!("{path}/items"))?,
                    None => ANY,
                };
                self.push(Node::Array { items, min, max }, path)
            }
            "object" => {
                let Some(props) = obj.get("properties").and_then(|p| p.as_object()) else {
                    return Ok(ANY_OBJECT);
                };
                if props.is_empty() {
                    return Ok(ANY_OBJECT);
                }
                if props.len() > MAX_PROPS {
                    return Err(schema_err(
                        path,
                        format!("more than {MAX_PROPS} properties"),
                    ));
                }
                let req: Vec<&str> = obj
                    .get("required")
                    .and_then(|r| r.as_array())
                    .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                    .unwrap_or_default();
                for r in &req {
                    if !props.contains_key(*r) {
                        return Err(schema_err(
                            path,
                            format!("required property {r:?} is not among the properties"),
                        ));
                    }
                }
                let mut keys = Vec::new();
                let mut values = Vec::new();
                let mut required = Vec::new();
                for (k, v) in props {
                    let quoted = serde_json::to_vec(&Value::String(k.clone())).unwrap_or_default();
                    keys.push(quoted[1..quoted.len() - 1].to_vec());
                    values.push(self.compile(v, &format!("{path}/properties/{k}"))?);
                    required.push(req.contains(&k.as_str()));
                }
                self.push(
                    Node::Object {
                        keys,
                        values,
                        required,
                    },
                    path,
                )
            }
            other => Err(schema_err(path, format!("unknown type {other:?}"))),
        }
    }

    fn resolve_ref(&mut self, r: &str, path: &str) -> Result<NodeId> {
        if let Some(&id) = self.refs.get(r) {
            return Ok(id);
        }
        let target = if r == "#" {
            Some(self.root)
        } else {
            r.strip_prefix("#/").and_then(|p| {
                p.split('/').try_fold(self.root, |v, part| {
                    v.get(part.replace("~1", "/").replace("~0", "~"))
                })
            })
        };
        let target = target.ok_or_else(|| {
            schema_err(
                path,
                format!("$ref {r:?} does not point into this schema (only local refs)"),
            )
        })?;
        // placeholder first, so that recursive references resolve to the same node
        let id = self.push(Node::Pending, path)?;
        self.refs.insert(r.to_string(), id);
        let inner = self.compile(target, r)?;
        self.nodes[id as usize] = self.nodes[inner as usize].clone();
        Ok(id)
    }
}

// ---------------------------------------------------------------------------------------------
// The automaton

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A value is expected (leading whitespace allowed).
    Value,
    Obj,
    /// Inside the key of a schema object (candidate properties in `cand`).
    Key,
    Arr,
    Str,
    Lit,
    Num,
}

// object states
const O_OPEN: u8 = 0;
const O_KEY: u8 = 1;
const O_COLON: u8 = 2;
const O_VALUE: u8 = 3;
const O_AFTER: u8 = 4;
const O_COMMA: u8 = 5;
// array states
const A_OPEN: u8 = 0;
const A_ITEM: u8 = 1;
const A_AFTER: u8 = 2;
const A_COMMA: u8 = 3;

#[derive(Clone, Copy, Debug)]
struct Frame {
    kind: Kind,
    st: u8,
    ws: u8,
    node: NodeId,
    /// Bytes matched (keys, literals) or digits (numbers).
    off: u32,
    /// Property index (objects), item count (arrays), characters (strings).
    count: u32,
    /// Candidate properties or literals.
    cand: u64,
}

impl Frame {
    fn new(kind: Kind, node: NodeId) -> Self {
        Frame {
            kind,
            st: 0,
            ws: 0,
            node,
            off: 0,
            count: 0,
            cand: 0,
        }
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

/// Count one whitespace byte of a gap (`ws`: spaces/tabs in the low bits, bit 7 = line break).
fn gap_ws(ws: &mut u8, b: u8) -> bool {
    const NL: u8 = 0x80;
    match b {
        b'\n' | b'\r' => {
            if *ws & NL != 0 && b == b'\n' && *ws & 0x40 == 0 {
                return false;
            }
            if b == b'\r' {
                // "\r\n" counts as one line break
                if *ws & (NL | 0x40) != 0 {
                    return false;
                }
                *ws |= NL | 0x40;
            } else if *ws & 0x40 != 0 {
                *ws &= !0x40;
            } else {
                *ws |= NL;
            }
            true
        }
        _ => {
            *ws &= !0x40;
            let n = (*ws & 0x3f) + 1;
            *ws = (*ws & NL) | n;
            n <= MAX_WS
        }
    }
}

/// The automaton's state: a stack of frames. Empty = a complete value was read.
#[derive(Clone, Debug)]
pub struct JsonState {
    stack: Vec<Frame>,
    done: bool,
}

impl JsonGrammar {
    pub fn start(&self) -> JsonState {
        JsonState {
            stack: vec![Frame::new(Kind::Value, self.root)],
            done: false,
        }
    }

    /// Candidate properties a key may name at property index `idx` (the remaining ones up to
    /// and including the next required one).
    fn key_candidates(required: &[bool], idx: u32) -> u64 {
        let mut m = 0u64;
        for (i, &r) in required.iter().enumerate().skip(idx as usize) {
            m |= 1 << i;
            if r {
                break;
            }
        }
        m
    }

    fn required_left(required: &[bool], idx: u32) -> bool {
        required.iter().skip(idx as usize).any(|&r| r)
    }

    /// A value of the top frame ended: pop it and move its parent on.
    fn value_done(&self, st: &mut JsonState) {
        st.stack.pop();
        match st.stack.last_mut() {
            None => st.done = true,
            Some(p) => match p.kind {
                Kind::Obj => {
                    if p.st == O_KEY {
                        p.st = O_COLON;
                    } else {
                        p.st = O_AFTER;
                        p.count += 1;
                    }
                    p.ws = 0;
                }
                Kind::Arr => {
                    p.st = A_AFTER;
                    p.count += 1;
                    p.ws = 0;
                }
                _ => {}
            },
        }
    }

    /// Whether the text so far is a complete value (EOS may come next).
    pub fn accepting(&self, st: &JsonState) -> bool {
        if st.done {
            return true;
        }
        match st.stack.as_slice() {
            [f] if f.kind == Kind::Num => num_final(f),
            [f] if f.kind == Kind::Lit => self.lit_final(f),
            _ => false,
        }
    }

    fn lit_options(&self, node: NodeId) -> &[Vec<u8>] {
        match &self.nodes[node as usize] {
            Node::Literals(l) => l,
            _ => &[],
        }
    }

    fn lit_final(&self, f: &Frame) -> bool {
        let opts = self.lit_options(f.node);
        (0..opts.len()).any(|i| f.cand & (1 << i) != 0 && opts[i].len() == f.off as usize)
    }

    /// Feed one byte; false if it cannot continue any allowed text (the state is then
    /// undefined and must be discarded).
    pub fn step(&self, st: &mut JsonState, b: u8) -> bool {
        loop {
            let Some(top) = st.stack.last().copied() else {
                return false;
            };
            match top.kind {
                Kind::Value => return self.step_value(st, top, b),
                Kind::Obj => return self.step_obj(st, top, b),
                Kind::Key => return self.step_key(st, top, b),
                Kind::Arr => {
                    let Node::Array { items, min, max } = self.nodes[top.node as usize] else {
                        return false;
                    };
                    let f = st.stack.last_mut().expect("top exists");
                    if is_ws(b) && f.st != A_ITEM {
                        return gap_ws(&mut f.ws, b);
                    }
                    match f.st {
                        A_OPEN if b == b']' => {
                            if min > 0 {
                                return false;
                            }
                            self.value_done(st);
                            return true;
                        }
                        A_OPEN | A_COMMA => {
                            if f.count >= max {
                                return false;
                            }
                            f.st = A_ITEM;
                            if st.stack.len() >= MAX_DEPTH {
                                return false;
                            }
                            st.stack.push(Frame::new(Kind::Value, items));
                            continue; // the byte starts the item
                        }
                        A_AFTER if b == b',' => {
                            if f.count >= max {
                                return false;
                            }
                            f.st = A_COMMA;
                            f.ws = 0;
                            return true;
                        }
                        A_AFTER if b == b']' => {
                            if f.count < min {
                                return false;
                            }
                            self.value_done(st);
                            return true;
                        }
                        _ => return false,
                    }
                }
                Kind::Str => return self.step_str(st, top, b),
                Kind::Lit => {
                    let opts = self.lit_options(top.node);
                    let off = top.off as usize;
                    let mut ext = 0u64;
                    for (i, o) in opts.iter().enumerate() {
                        if top.cand & (1 << i) != 0 && o.len() > off && o[off] == b {
                            ext |= 1 << i;
                        }
                    }
                    if ext != 0 {
                        let f = st.stack.last_mut().expect("top exists");
                        f.cand = ext;
                        f.off += 1;
                        let off = f.off as usize;
                        let longer =
                            (0..opts.len()).any(|i| ext & (1 << i) != 0 && opts[i].len() > off);
                        if !longer {
                            self.value_done(st);
                        }
                        return true;
                    }
                    if self.lit_final(&top) {
                        self.value_done(st);
                        continue; // the byte belongs to the parent
                    }
                    return false;
                }
                Kind::Num => {
                    let integer = matches!(
                        self.nodes[top.node as usize],
                        Node::Number { integer: true }
                    );
                    let f = st.stack.last_mut().expect("top exists");
                    if num_step(f, b, integer) {
                        return true;
                    }
                    if num_final(&top) {
                        self.value_done(st);
                        continue;
                    }
                    return false;
                }
            }
        }
    }

    fn step_value(&self, st: &mut JsonState, top: Frame, b: u8) -> bool {
        if is_ws(b) {
            let f = st.stack.last_mut().expect("top exists");
            return gap_ws(&mut f.ws, b);
        }
        let mut node = top.node;
        // resolve unions by the first byte
        while let Node::Union(alts) = &self.nodes[node as usize] {
            match alts
                .iter()
                .find(|&&a| self.first_bytes(a, &mut Vec::new())[b as usize])
            {
                Some(&a) => node = a,
                None => return false,
            }
        }
        let frame = match &self.nodes[node as usize] {
            Node::Any => {
                let n = match b {
                    b'{' => ANY_OBJECT,
                    b'[' => ANY_ARRAY,
                    b'"' => ANY_STR,
                    b'-' | b'0'..=b'9' => ANY_NUM,
                    b't' | b'f' | b'n' => ANY_LIT,
                    _ => return false,
                };
                let mut tmp = top;
                tmp.node = n;
                st.stack.pop();
                st.stack.push(tmp);
                return self.step_value(st, tmp, b);
            }
            Node::AnyObject | Node::Object { .. } => {
                if b != b'{' {
                    return false;
                }
                let mut f = Frame::new(Kind::Obj, node);
                f.st = O_OPEN;
                st.stack.pop();
                st.stack.push(f);
                return true;
            }
            Node::Array { .. } => {
                if b != b'[' {
                    return false;
                }
                st.stack.pop();
                st.stack.push(Frame::new(Kind::Arr, node));
                return true;
            }
            Node::Str { .. } => {
                if b != b'"' {
                    return false;
                }
                st.stack.pop();
                st.stack.push(Frame::new(Kind::Str, node));
                return true;
            }
            Node::Literals(opts) => {
                let mut f = Frame::new(Kind::Lit, node);
                f.cand = if opts.len() >= 64 {
                    u64::MAX
                } else {
                    (1u64 << opts.len()) - 1
                };
                f
            }
            Node::Number { .. } => Frame::new(Kind::Num, node),
            Node::Union(_) | Node::Pending => return false,
        };
        st.stack.pop();
        st.stack.push(frame);
        self.step(st, b)
    }

    fn step_obj(&self, st: &mut JsonState, top: Frame, b: u8) -> bool {
        let schema = match &self.nodes[top.node as usize] {
            Node::Object {
                values, required, ..
            } => Some((values, required)),
            _ => None,
        };
        let depth_ok = st.stack.len() < MAX_DEPTH;
        let f = st.stack.last_mut().expect("top exists");
        if is_ws(b) && f.st != O_KEY && f.st != O_VALUE {
            return gap_ws(&mut f.ws, b);
        }
        match (f.st, b) {
            (O_OPEN | O_COMMA, b'"') => {
                if !depth_ok {
                    return false;
                }
                f.st = O_KEY;
                match schema {
                    Some((_, required)) => {
                        let cand = Self::key_candidates(required, f.count);
                        if cand == 0 {
                            return false;
                        }
                        let mut k = Frame::new(Kind::Key, top.node);
                        k.cand = cand;
                        st.stack.push(k);
                    }
                    None => st.stack.push(Frame::new(Kind::Str, ANY_STR)),
                }
                true
            }
            (O_OPEN | O_AFTER, b'}') => {
                if let Some((_, required)) = schema
                    && Self::required_left(required, f.count)
                {
                    return false;
                }
                self.value_done(st);
                true
            }
            (O_COLON, b':') => {
                if !depth_ok {
                    return false;
                }
                f.st = O_VALUE;
                f.ws = 0;
                let child = match schema {
                    Some((values, _)) => values[f.count as usize],
                    None => ANY,
                };
                st.stack.push(Frame::new(Kind::Value, child));
                true
            }
            (O_AFTER, b',') => {
                if let Some((_, required)) = schema
                    && Self::key_candidates(required, f.count) == 0
                {
                    return false;
                }
                f.st = O_COMMA;
                f.ws = 0;
                true
            }
            _ => false,
        }
    }

    fn step_key(&self, st: &mut JsonState, top: Frame, b: u8) -> bool {
        let Node::Object { keys, .. } = &self.nodes[top.node as usize] else {
            return false;
        };
        let off = top.off as usize;
        if b == b'"' {
            let done = (0..keys.len()).find(|&i| top.cand & (1 << i) != 0 && keys[i].len() == off);
            if let Some(i) = done {
                st.stack.pop();
                let p = st.stack.last_mut().expect("key has a parent object");
                p.count = i as u32; // the property chosen
                p.st = O_COLON;
                p.ws = 0;
                return true;
            }
        }
        let mut ext = 0u64;
        for (i, k) in keys.iter().enumerate() {
            if top.cand & (1 << i) != 0 && k.len() > off && k[off] == b {
                ext |= 1 << i;
            }
        }
        if ext == 0 {
            return false;
        }
        let f = st.stack.last_mut().expect("top exists");
        f.cand = ext;
        f.off += 1;
        true
    }

    fn step_str(&self, st: &mut JsonState, top: Frame, b: u8) -> bool {
        let (min, max) = match self.nodes[top.node as usize] {
            Node::Str { min, max } => (min, max),
            _ => (0, u32::MAX),
        };
        let f = st.stack.last_mut().expect("top exists");
        if f.st == 0 && f.off > 0 && b & 0xC0 != 0x80 {
            return false; // an unfinished UTF-8 character
        }
        match f.st {
            0 => match b {
                b'"' => {
                    if f.count < min {
                        return false;
                    }
                    self.value_done(st);
                    true
                }
                b'\\' => {
                    f.st = 1;
                    true
                }
                0..=0x1f => false,
                _ => {
                    // UTF-8: `off` holds the continuation bytes still expected
                    let cont = b & 0xC0 == 0x80;
                    if cont != (f.off > 0) {
                        return false;
                    }
                    if cont {
                        f.off -= 1;
                        return true;
                    }
                    f.off = match b {
                        0x20..=0x7f => 0,
                        0xC2..=0xDF => 1,
                        0xE0..=0xEF => 2,
                        0xF0..=0xF4 => 3,
                        _ => return false,
                    };
                    f.count += 1;
                    f.count <= max
                }
            },
            1 => match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                    f.st = 0;
                    f.count += 1;
                    f.count <= max
                }
                b'u' => {
                    f.st = 2;
                    true
                }
                _ => false,
            },
            s => {
                if !b.is_ascii_hexdigit() {
                    return false;
                }
                if s == 5 {
                    f.st = 0;
                    f.count += 1;
                    f.count <= max
                } else {
                    f.st = s + 1;
                    true
                }
            }
        }
    }
}

fn num_final(f: &Frame) -> bool {
    matches!(f.st, 2 | 3 | 5 | 8)
}

/// Number grammar `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?` with digit caps.
fn num_step(f: &mut Frame, b: u8, integer: bool) -> bool {
    let digit = b.is_ascii_digit();
    let (st, cap) = match (f.st, b) {
        (0, b'-') => (1, 0),
        (0 | 1, b'0') => (2, 0),
        (0 | 1, _) if digit => (3, MAX_INT_DIGITS),
        (3, _) if digit => (3, MAX_INT_DIGITS),
        (2 | 3, b'.') if !integer => (4, 0),
        (4 | 5, _) if digit => (5, MAX_FRAC_DIGITS),
        (2 | 3 | 5, b'e' | b'E') if !integer => (6, 0),
        (6, b'+' | b'-') => (7, 0),
        (6..=8, _) if digit => (8, MAX_EXP_DIGITS),
        _ => return false,
    };
    if st != f.st {
        f.off = 0;
    }
    if cap > 0 {
        f.off += 1;
        if f.off > cap as u32 {
            return false;
        }
    }
    f.st = st;
    true
}

// ---------------------------------------------------------------------------------------------
// Tokens

/// The vocabulary as a byte trie: every token's raw bytes, shared prefixes stored once.
pub struct TokenTrie {
    /// Children of node `i`: `edges[first[i]..first[i + 1]]`, sorted by byte.
    first: Vec<u32>,
    edges: Vec<(u8, u32)>,
    /// Tokens ending at node `i`: `ends[end_first[i]..end_first[i + 1]]`.
    end_first: Vec<u32>,
    ends: Vec<u32>,
    pub vocab: usize,
    /// The raw bytes of every token (`None`: special, never allowed by a grammar).
    pub bytes: Vec<Option<Vec<u8>>>,
}

impl TokenTrie {
    pub fn new(bytes: Vec<Option<Vec<u8>>>) -> Self {
        // build with per-node maps, then flatten
        let mut children: Vec<Vec<(u8, u32)>> = vec![Vec::new()];
        let mut ends: Vec<Vec<u32>> = vec![Vec::new()];
        for (id, b) in bytes.iter().enumerate() {
            let Some(b) = b else { continue };
            if b.is_empty() {
                continue;
            }
            let mut n = 0usize;
            for &c in b {
                n = match children[n].iter().find(|e| e.0 == c) {
                    Some(e) => e.1 as usize,
                    None => {
                        children.push(Vec::new());
                        ends.push(Vec::new());
                        let k = children.len() - 1;
                        children[n].push((c, k as u32));
                        k
                    }
                };
            }
            ends[n].push(id as u32);
        }
        let mut first = Vec::with_capacity(children.len() + 1);
        let mut edges = Vec::new();
        let mut end_first = Vec::with_capacity(children.len() + 1);
        let mut flat_ends = Vec::new();
        for (c, e) in children.iter_mut().zip(&ends) {
            c.sort_unstable();
            first.push(edges.len() as u32);
            edges.extend_from_slice(c);
            end_first.push(flat_ends.len() as u32);
            flat_ends.extend_from_slice(e);
        }
        first.push(edges.len() as u32);
        end_first.push(flat_ends.len() as u32);
        TokenTrie {
            first,
            edges,
            end_first,
            ends: flat_ends,
            vocab: bytes.len(),
            bytes,
        }
    }

    pub fn nodes(&self) -> usize {
        self.first.len() - 1
    }

    /// Mark every token whose bytes the automaton accepts from `state`.
    fn allowed(&self, g: &JsonGrammar, state: &JsonState, out: &mut [bool]) {
        let mut states: Vec<JsonState> = vec![state.clone()];
        self.visit(g, 0, 0, &mut states, out);
    }

    fn visit(
        &self,
        g: &JsonGrammar,
        node: usize,
        depth: usize,
        states: &mut Vec<JsonState>,
        out: &mut [bool],
    ) {
        if states.len() <= depth + 1 {
            states.push(JsonState {
                stack: Vec::with_capacity(8),
                done: false,
            });
        }
        for e in self.first[node]..self.first[node + 1] {
            let (b, child) = self.edges[e as usize];
            let (head, tail) = states.split_at_mut(depth + 1);
            let next = &mut tail[0];
            next.stack.clear();
            next.stack.extend_from_slice(&head[depth].stack);
            next.done = head[depth].done;
            if !g.step(next, b) {
                continue;
            }
            let c = child as usize;
            for &t in &self.ends[self.end_first[c] as usize..self.end_first[c + 1] as usize] {
                out[t as usize] = true;
            }
            self.visit(g, c, depth + 1, states, out);
        }
    }
}

/// A grammar applied to one generation: which tokens may come next, and the state after each.
pub trait TokenConstraint: Send {
    /// Whether `tok` may come next (EOS only once the text is complete).
    fn allows(&mut self, tok: u32) -> bool;
    /// Set the logit of every token that may not come next to −∞.
    fn mask(&mut self, logits: &mut [f32]);
    /// Consume the chosen token.
    fn advance(&mut self, tok: u32) -> Result<()>;
    /// Whether the text so far is complete.
    fn complete(&self) -> bool;
}

/// JSON output under a [`JsonGrammar`].
pub struct JsonConstraint {
    grammar: Arc<JsonGrammar>,
    trie: Arc<TokenTrie>,
    eos: Vec<u32>,
    state: JsonState,
}

impl JsonConstraint {
    pub fn new(grammar: Arc<JsonGrammar>, trie: Arc<TokenTrie>, eos: Vec<u32>) -> Self {
        let state = grammar.start();
        JsonConstraint {
            grammar,
            trie,
            eos,
            state,
        }
    }
}

impl TokenConstraint for JsonConstraint {
    fn allows(&mut self, tok: u32) -> bool {
        if self.eos.contains(&tok) {
            return self.grammar.accepting(&self.state);
        }
        let Some(Some(bytes)) = self.trie.bytes.get(tok as usize) else {
            return false;
        };
        if bytes.is_empty() {
            return false;
        }
        let mut s = self.state.clone();
        bytes.iter().all(|&b| self.grammar.step(&mut s, b))
    }

    fn mask(&mut self, logits: &mut [f32]) {
        let mut ok = vec![false; logits.len()];
        self.trie.allowed(&self.grammar, &self.state, &mut ok);
        if self.grammar.accepting(&self.state) {
            for &e in &self.eos {
                if let Some(x) = ok.get_mut(e as usize) {
                    *x = true;
                }
            }
        }
        for (l, a) in logits.iter_mut().zip(ok) {
            if !a {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    fn advance(&mut self, tok: u32) -> Result<()> {
        if self.eos.contains(&tok) {
            return Ok(());
        }
        let bytes = self
            .trie
            .bytes
            .get(tok as usize)
            .and_then(|b| b.as_ref())
            .ok_or_else(|| LmError::Config(format!("token {tok} has no text")))?;
        for &b in bytes {
            if !self.grammar.step(&mut self.state, b) {
                return Err(LmError::Config(format!(
                    "token {tok} does not continue the constrained output"
                )));
            }
        }
        Ok(())
    }

    fn complete(&self) -> bool {
        self.grammar.accepting(&self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn accepts(g: &JsonGrammar, text: &str) -> bool {
        let mut s = g.start();
        text.bytes().all(|b| g.step(&mut s, b)) && g.accepting(&s)
    }

    fn prefix_ok(g: &JsonGrammar, text: &str) -> bool {
        let mut s = g.start();
        text.bytes().all(|b| g.step(&mut s, b))
    }

    #[test]
    fn any_object_accepts_json_objects_only() {
        let g = JsonGrammar::any_object();
        for ok in [
            r#"{}"#,
            r#"{"a": 1}"#,
            r#"{"a": [1, 2.5e-3, "x\n\u00e9", true, null, {"b": false}], "c": -0}"#,
            "{\"é\": \"日本\"}",
            "{\n  \"k\": \"v\"\n}",
        ] {
            assert!(accepts(&g, ok), "{ok}");
            assert!(serde_json::from_str::<Value>(ok).is_ok());
        }
        for bad in [
            r#"[1]"#,
            r#"{"a" 1}"#,
            r#"{"a": 01}"#,
            r#"{"a": tru}"#,
            r#"{"a": 1,}"#,
            r#"{a: 1}"#,
            "{\"a\": \"x\ny\"}",
        ] {
            assert!(!accepts(&g, bad), "{bad}");
        }
        for bad in [&b"{\"\xff\"}"[..], b"{\"\xc3\"}", b"{\"\x80\"}"] {
            let mut s = g.start();
            assert!(!bad.iter().all(|&b| g.step(&mut s, b)) || !g.accepting(&s));
        }
        for bad in [] as [&str; 0] {
            assert!(!accepts(&g, bad), "{bad}");
        }
        assert!(prefix_ok(&g, r#"{"a": [1, "#));
        assert!(!accepts(&g, r#"{"a": [1, "#));
        // whitespace runs are capped: one line break per gap, a few spaces
        assert!(!prefix_ok(&g, &format!("{{{}", " ".repeat(40))));
        assert!(!prefix_ok(&g, "{\n\n"));
        assert!(prefix_ok(&g, "{\r\n    \"a\""));
    }

    #[test]
    fn schema_fixes_keys_types_and_order() {
        let schema = json!({
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 5},
                "rating": {"type": "integer"},
                "liked": {"type": "boolean"},
                "genre": {"enum": ["comedy", "drama"]},
                "note": {"type": ["string", "null"]},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2}
            },
            "required": ["title", "rating", "genre", "tags"]
        });
        let g = JsonGrammar::from_schema(&schema).unwrap();
        assert!(accepts(
            &g,
            r#"{"title": "Heat", "rating": 4, "liked": true, "genre": "drama", "note": null, "tags": ["a"]}"#
        ));
        assert!(accepts(
            &g,
            r#"{"title":"Heat","rating":4,"genre":"comedy","tags":["a","b"]}"#
        ));
        for bad in [
            r#"{"rating": 4, "title": "Heat", "genre": "drama", "tags": ["a"]}"#, // order
            r#"{"title": "Heat!!", "rating": 4, "genre": "drama", "tags": ["a"]}"#, // maxLength
            r#"{"title": "Heat", "rating": 4.5, "genre": "drama", "tags": ["a"]}"#, // integer
            r#"{"title": "Heat", "rating": 4, "genre": "horror", "tags": ["a"]}"#, // enum
            r#"{"title": "Heat", "rating": 4, "genre": "drama", "tags": []}"#,    // minItems
            r#"{"title": "Heat", "rating": 4, "genre": "drama", "tags": ["a","b","c"]}"#,
            r#"{"title": "Heat", "rating": 4, "genre": "drama"}"#, // required tags
            r#"{"title": "Heat", "extra": 1}"#,
        ] {
            assert!(!accepts(&g, bad), "{bad}");
        }
    }

    #[test]
    fn refs_recursion_and_bad_schemas() {
        let schema = json!({
            "$defs": {"node": {"type": "object", "properties": {
                "v": {"type": "integer"},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}
            }, "required": ["v"]}},
            "$ref": "#/$defs/node"
        });
        let g = JsonGrammar::from_schema(&schema).unwrap();
        assert!(accepts(
            &g,
            r#"{"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": []}]}"#
        ));
        assert!(!accepts(&g, r#"{"kids": []}"#));
        for bad in [
            json!({"type": "object", "properties": {"a": {"type": "wat"}}}),
            json!({"anyOf": [{"type": "object", "properties": {"a": {}}}, {"type": "object"}]}),
            json!({"$ref": "#/$defs/missing"}),
            json!({"type": "object", "properties": {"a": {}}, "required": ["b"]}),
            json!(7),
        ] {
            let e = JsonGrammar::from_schema(&bad).unwrap_err().to_string();
            assert!(e.contains("schema"), "{e}");
        }
    }

    #[test]
    fn top_level_numbers_and_literals_complete() {
        let g = JsonGrammar::from_schema(&json!({"type": "number"})).unwrap();
        assert!(accepts(&g, "12.5"));
        assert!(!accepts(&g, "12."));
        assert!(!prefix_ok(&g, "1234567890123456789"));
        let g = JsonGrammar::from_schema(&json!({"enum": [1, 12, "x"]})).unwrap();
        assert!(accepts(&g, "1"));
        assert!(accepts(&g, "12"));
        assert!(accepts(&g, "\"x\""));
        assert!(!accepts(&g, "2"));
    }

    #[test]
    fn trie_mask_equals_checking_every_token() {
        let words = [
            "{", "}", "\"", "\":", "{\"", "a", "ab", "\"a\"", " ", ":", ",", "1", "12", "true",
            "tr", "ue", "\"}", "x\"", "\\", "n", "null", "[", "]", "-", ".5", "e",
        ];
        let mut bytes: Vec<Option<Vec<u8>>> =
            words.iter().map(|w| Some(w.as_bytes().to_vec())).collect();
        bytes.push(None); // eos
        let eos = (bytes.len() - 1) as u32;
        let trie = Arc::new(TokenTrie::new(bytes.clone()));
        let g = Arc::new(JsonGrammar::any_object());
        let mut c = JsonConstraint::new(g.clone(), trie.clone(), vec![eos]);
        for tok in [
            "{\"", "ab", "\":", " ", "12", ",", "\"a\"", ":", "tr", "ue", "}",
        ] {
            let mut logits = vec![0f32; bytes.len()];
            c.mask(&mut logits);
            for t in 0..bytes.len() as u32 {
                assert_eq!(
                    logits[t as usize].is_finite(),
                    c.allows(t),
                    "token {t} after {:?}",
                    c.state
                );
            }
            let id = words.iter().position(|w| *w == tok).unwrap() as u32;
            assert!(c.allows(id), "{tok}");
            c.advance(id).unwrap();
        }
        assert!(c.complete());
        assert!(c.allows(eos));
        let mut logits = vec![0f32; bytes.len()];
        c.mask(&mut logits);
        assert_eq!(
            logits.iter().filter(|l| l.is_finite()).count(),
            1,
            "only EOS after a complete value"
        );
    }
}
