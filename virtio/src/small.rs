//! A list that keeps its first `N` items inline and moves to the heap only past that.
//!
//! Descriptor chains and iovec lists of block requests are almost always 1–3 entries long; this
//! keeps them off the allocator on the hot path without a new dependency. Safe code only.

#[derive(Clone, Debug)]
pub(crate) enum SmallList<T: Copy, const N: usize> {
    Inline { items: [T; N], len: usize },
    Heap(Vec<T>),
}

impl<T: Copy, const N: usize> SmallList<T, N> {
    /// An empty list; `filler` occupies the unused inline slots and is never observed.
    pub(crate) fn new(filler: T) -> Self {
        SmallList::Inline {
            items: [filler; N],
            len: 0,
        }
    }

    pub(crate) fn push(&mut self, item: T) {
        match self {
            SmallList::Inline { items, len } if *len < N => {
                items[*len] = item;
                *len += 1;
            }
            SmallList::Inline { items, len } => {
                let mut v = Vec::with_capacity(2 * N.max(2));
                v.extend_from_slice(&items[..*len]);
                v.push(item);
                *self = SmallList::Heap(v);
            }
            SmallList::Heap(v) => v.push(item),
        }
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        match self {
            SmallList::Inline { items, len } => &items[..*len],
            SmallList::Heap(v) => v,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_list_spills_to_heap_keeping_order() {
        let mut l = SmallList::<u32, 2>::new(0);
        for i in 0..5 {
            l.push(i);
        }
        assert_eq!(l.as_slice(), &[0, 1, 2, 3, 4]);
        assert!(matches!(l, SmallList::Heap(_)));
        assert_eq!(l.len(), 5);
    }
}
