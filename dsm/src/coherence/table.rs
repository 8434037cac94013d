//! Per-page state of a segment that costs nothing for pages never touched.
//!
//! A segment of 4 GiB has a million pages and most programs touch a part of
//! theirs, so creating or attaching one must not do a million of anything.
//! A table is cut into leaves of [`LEAF_PAGES`] pages. A leaf holds nothing
//! until one of its pages leaves the default value; then a sorted list of
//! the pages that did, one word each (page offset and value together, so a
//! sparse touch costs a word a page); then, once that list holds three
//! quarters of the leaf, an array of one word a page without offsets.

/// Pages a leaf covers (16 MiB of segment).
pub(super) const LEAF_PAGES: u32 = 1 << OFFSET_BITS;
/// Bits of a page's offset in its leaf, at the top of a sparse word.
const OFFSET_BITS: u32 = 12;
/// A sparse leaf becomes an array once it lists this many pages: from then
/// on the array takes less memory than the list would.
const DENSE_AT: usize = (LEAF_PAGES as usize) * 3 / 4;

/// The machine word a table stores a page in.
pub(super) trait Word: Copy + Default + Eq {
    const BITS: u32;
    fn from_u64(bits: u64) -> Self;
    fn to_u64(self) -> u64;
}

impl Word for u16 {
    const BITS: u32 = 16;
    fn from_u64(bits: u64) -> Self {
        bits as u16
    }
    fn to_u64(self) -> u64 {
        u64::from(self)
    }
}

impl Word for u64 {
    const BITS: u32 = 64;
    fn from_u64(bits: u64) -> Self {
        bits
    }
    fn to_u64(self) -> u64 {
        self
    }
}

/// A per-page value that packs into the low `Word::BITS - 12` bits of a
/// word, the default value into 0.
pub(super) trait PageValue: Copy + Eq + Default {
    type Word: Word;
    fn pack(self) -> u64;
    fn unpack(bits: u64) -> Self;
}

/// Bits a value may use.
pub(super) const fn value_bits<W: Word>() -> u32 {
    W::BITS - OFFSET_BITS
}

enum Leaf<W> {
    Empty,
    /// Sorted by offset; offset in the top bits of each word, value below.
    Sparse(Vec<W>),
    /// One word a page (the value alone).
    Dense(Box<[W]>),
}

pub(super) struct PageTable<V: PageValue> {
    pages: u32,
    leaves: Vec<Leaf<V::Word>>,
}

impl<V: PageValue> PageTable<V> {
    /// Every page at its default value, nothing allocated per page.
    pub(super) fn new(pages: u32) -> Self {
        let mut leaves = Vec::new();
        leaves.resize_with(pages.div_ceil(LEAF_PAGES) as usize, || Leaf::Empty);
        PageTable { pages, leaves }
    }

    pub(super) fn pages(&self) -> u32 {
        self.pages
    }

    /// The value of `page`; the default beyond the table.
    pub(super) fn get(&self, page: u32) -> V {
        let (leaf, offset) = split(page);
        match self.leaves.get(leaf) {
            None | Some(Leaf::Empty) => V::default(),
            Some(Leaf::Sparse(words)) => match search(words, offset) {
                Ok(i) => V::unpack(words[i].to_u64() & value_mask::<V::Word>()),
                Err(_) => V::default(),
            },
            Some(Leaf::Dense(words)) => V::unpack(words[offset as usize].to_u64()),
        }
    }

    /// Set `page` to `value` (ignored beyond the table).
    pub(super) fn set(&mut self, page: u32, value: V) {
        if page >= self.pages {
            return;
        }
        let bits = value.pack();
        debug_assert!(
            bits <= value_mask::<V::Word>(),
            "value does not fit its word"
        );
        let (leaf, offset) = split(page);
        let Some(slot) = self.leaves.get_mut(leaf) else {
            return;
        };
        match slot {
            Leaf::Empty if bits == 0 => {}
            Leaf::Empty => *slot = Leaf::Sparse(vec![sparse_word(offset, bits)]),
            Leaf::Sparse(words) => {
                match search(words, offset) {
                    Ok(i) if bits == 0 => {
                        words.remove(i);
                    }
                    Ok(i) => words[i] = sparse_word(offset, bits),
                    Err(_) if bits == 0 => {}
                    Err(i) => {
                        if words.len() == words.capacity() {
                            // Grow by a quarter, not double: the slack is
                            // memory per touched page too.
                            words.reserve_exact(words.len() / 4 + 1);
                        }
                        words.insert(i, sparse_word(offset, bits));
                    }
                }
                if words.is_empty() {
                    *slot = Leaf::Empty;
                } else if words.len() >= DENSE_AT {
                    *slot = Leaf::Dense(densify(words));
                }
            }
            Leaf::Dense(words) => words[offset as usize] = V::Word::from_u64(bits),
        }
    }

    /// The pages not at their default value, in order.
    pub(super) fn present(&self) -> impl Iterator<Item = (u32, V)> + '_ {
        self.leaves.iter().enumerate().flat_map(|(leaf, l)| {
            let base = leaf as u32 * LEAF_PAGES;
            let words: &[V::Word] = match l {
                Leaf::Empty => &[],
                Leaf::Sparse(w) => w,
                Leaf::Dense(w) => w,
            };
            let dense = matches!(l, Leaf::Dense(_));
            words.iter().enumerate().filter_map(move |(i, w)| {
                let bits = w.to_u64();
                if dense {
                    (bits != 0).then(|| (base + i as u32, V::unpack(bits)))
                } else {
                    let offset = (bits >> value_bits::<V::Word>()) as u32;
                    let value = V::unpack(bits & value_mask::<V::Word>());
                    Some((base + offset, value))
                }
            })
        })
    }

    /// Heap bytes the table holds (what it costs the daemon).
    pub(super) fn heap_bytes(&self) -> usize {
        let word = std::mem::size_of::<V::Word>();
        self.leaves.capacity() * std::mem::size_of::<Leaf<V::Word>>()
            + self
                .leaves
                .iter()
                .map(|l| match l {
                    Leaf::Empty => 0,
                    Leaf::Sparse(w) => w.capacity() * word,
                    Leaf::Dense(w) => w.len() * word,
                })
                .sum::<usize>()
    }
}

fn split(page: u32) -> (usize, u32) {
    ((page / LEAF_PAGES) as usize, page % LEAF_PAGES)
}

fn value_mask<W: Word>() -> u64 {
    (1u64 << value_bits::<W>()) - 1
}

fn sparse_word<W: Word>(offset: u32, bits: u64) -> W {
    W::from_u64((u64::from(offset) << value_bits::<W>()) | bits)
}

fn search<W: Word>(words: &[W], offset: u32) -> Result<usize, usize> {
    words.binary_search_by_key(&offset, |w| (w.to_u64() >> value_bits::<W>()) as u32)
}

fn densify<W: Word>(words: &[W]) -> Box<[W]> {
    let mut dense = vec![W::default(); LEAF_PAGES as usize].into_boxed_slice();
    for w in words {
        let bits = w.to_u64();
        let offset = (bits >> value_bits::<W>()) as usize;
        dense[offset] = W::from_u64(bits & value_mask::<W>());
    }
    dense
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct Small(u8);
    impl PageValue for Small {
        type Word = u16;
        fn pack(self) -> u64 {
            u64::from(self.0)
        }
        fn unpack(bits: u64) -> Self {
            Small(bits as u8)
        }
    }

    #[test]
    fn a_new_table_allocates_nothing_per_page() {
        let table = PageTable::<Small>::new(1 << 20); // 4 GiB of pages
        assert_eq!(table.present().count(), 0);
        assert!(table.heap_bytes() < 16 << 10, "{}", table.heap_bytes());
        assert_eq!(table.get(12345), Small(0));
        assert_eq!(table.get(u32::MAX), Small(0));
    }

    /// Against a map, through sparse leaves, dense ones and back to empty.
    #[test]
    fn agrees_with_a_map_whatever_the_order_and_density() {
        let pages = 3 * LEAF_PAGES + 17;
        let mut table = PageTable::<Small>::new(pages);
        let mut model = BTreeMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..60_000u32 {
            let page = if round < 40_000 {
                // Fill the first leaf past the dense mark, then scatter.
                let span = (LEAF_PAGES + (round / 10_000) * LEAF_PAGES).min(pages);
                (next() % u64::from(span)) as u32
            } else {
                (next() % u64::from(pages)) as u32
            };
            // Later rounds mostly clear.
            let value = if round > 50_000 && next() % 4 != 0 {
                0
            } else {
                (next() % 16) as u8
            };
            table.set(page, Small(value));
            if value == 0 {
                model.remove(&page);
            } else {
                model.insert(page, value);
            }
            if round % 997 == 0 {
                let listed: Vec<(u32, u8)> = table.present().map(|(p, v)| (p, v.0)).collect();
                let expected: Vec<(u32, u8)> = model.iter().map(|(p, v)| (*p, *v)).collect();
                assert!(listed == expected, "round {round}");
            }
        }
        for page in 0..pages {
            assert_eq!(table.get(page).0, model.get(&page).copied().unwrap_or(0));
        }
        table.set(pages, Small(3));
        assert_eq!(table.get(pages), Small(0), "beyond the table");
    }

    #[test]
    fn a_sparse_touch_costs_about_a_word_a_page() {
        let pages = 1 << 20;
        let mut table = PageTable::<Small>::new(pages);
        let touched: Vec<u32> = (0..pages).step_by(100).collect();
        for &p in &touched {
            table.set(p, Small(1));
        }
        let per_page = table.heap_bytes() as f64 / touched.len() as f64;
        assert!(per_page <= 4.0, "{per_page} bytes per touched page");
        // Dense: every page of the first 40 MiB.
        let mut table = PageTable::<Small>::new(pages);
        for p in 0..10240 {
            table.set(p, Small(2));
        }
        let per_page = table.heap_bytes() as f64 / 10240.0;
        assert!(per_page <= 4.0, "{per_page} bytes per touched page");
    }
}
