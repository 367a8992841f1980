// Elements 4i .. 4i+7 of Q4_K $W for the matrix product (8 of one sub-block): the sub-block's
// scale and min decoded once, the nibbles from two aligned words; the same values as two
// load_$W calls.
fn load8_$W(i: u32, hi: bool) -> Pair {
    if !hi || (i & 1u) == 1u {
        return load8_any_$W(i, hi);
    }
    let s = sub_$W(i * 4u);
    return Pair(weights4_$W(s, $W[s.word]), weights4_$W(s, $W[s.word + 1u]));
}
