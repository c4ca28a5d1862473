//! [`Fifo`]: a queue that holds no allocation while it is empty.
//!
//! Invariants:
//! - Inline it is one pointer (a `VecDeque` is four words): a connection keeps a dozen queues,
//!   nearly all of them empty while it is idle, and idle connections are most of a fleet.
//! - Empty, it holds no heap memory, whichever call emptied it; the first push allocates room
//!   for one entry (most of these queues never hold more), and it grows as a `VecDeque` does.
//! - Order is FIFO, as `VecDeque`'s.

use std::collections::VecDeque;

/// A FIFO that holds nothing while empty. A transaction tracker has nine queues and a new-path
/// session five more, nearly all empty on an idle connection; as `VecDeque`s, which keep their
/// buffer when emptied, they were 0.3 KiB of every connection on both paths, and more where
/// they had once held an entry. The price is an allocation each time an empty queue gets an
/// entry, far below the syscalls that carry it.
#[derive(Debug)]
#[allow(
    clippy::box_collection,
    reason = "the box is the point: one pointer inline, and nothing at all while empty"
)]
pub struct Fifo<T>(Option<Box<VecDeque<T>>>);

impl<T> Default for Fifo<T> {
    fn default() -> Self {
        Fifo::new()
    }
}

impl<T> Fifo<T> {
    pub const fn new() -> Self {
        Fifo(None)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    pub fn front(&self) -> Option<&T> {
        self.0.as_ref().and_then(|q| q.front())
    }

    pub fn push_back(&mut self, v: T) {
        self.0
            .get_or_insert_with(|| Box::new(VecDeque::with_capacity(1)))
            .push_back(v);
    }

    pub fn push_front(&mut self, v: T) {
        self.0
            .get_or_insert_with(|| Box::new(VecDeque::with_capacity(1)))
            .push_front(v);
    }

    pub fn pop_front(&mut self) -> Option<T> {
        let v = self.0.as_mut().and_then(|q| q.pop_front());
        self.free_if_empty();
        v
    }

    pub fn remove(&mut self, i: usize) -> Option<T> {
        let v = self.0.as_mut().and_then(|q| q.remove(i));
        self.free_if_empty();
        v
    }

    pub fn retain(&mut self, f: impl FnMut(&T) -> bool) {
        if let Some(q) = self.0.as_mut() {
            q.retain(f);
        }
        self.free_if_empty();
    }

    pub fn clear(&mut self) {
        self.0 = None;
    }

    /// Where the first entry `f` accepts is, from the front.
    pub fn position(&self, f: impl FnMut(&T) -> bool) -> Option<usize> {
        self.0.as_ref().and_then(|q| q.iter().position(f))
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().flat_map(|q| q.iter())
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.0.iter_mut().flat_map(|q| q.iter_mut())
    }

    /// Empties the queue and yields what it held, oldest first.
    pub fn take_all(&mut self) -> impl Iterator<Item = T> {
        self.0.take().into_iter().flat_map(|q| q.into_iter())
    }

    /// Entries it has room for without allocating.
    pub fn capacity(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.capacity())
    }

    fn free_if_empty(&mut self) {
        if self.0.as_ref().is_some_and(|q| q.is_empty()) {
            self.0 = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_order_pushed_and_removes_from_the_middle() {
        let mut q = Fifo::new();
        for i in 0..5 {
            q.push_back(i);
        }
        q.push_front(9);
        assert_eq!(q.remove(3), Some(2));
        assert_eq!(q.pop_front(), Some(9));
        assert_eq!(q.iter().copied().collect::<Vec<_>>(), vec![0, 1, 3, 4]);
        q.retain(|&i| i != 1);
        assert_eq!(q.take_all().collect::<Vec<_>>(), vec![0, 3, 4]);
    }

    #[test]
    fn holds_no_buffer_once_empty_whichever_call_emptied_it() {
        let mut q = Fifo::new();
        assert_eq!(q.capacity(), 0);
        q.push_back(1u8);
        assert_eq!(q.capacity(), 1, "room for one, not a VecDeque's usual four");
        q.pop_front();
        assert_eq!((q.capacity(), q.is_empty()), (0, true), "pop_front");
        q.push_back(1);
        q.remove(0);
        assert_eq!(q.capacity(), 0, "remove");
        q.push_back(1);
        q.retain(|_| false);
        assert_eq!(q.capacity(), 0, "retain");
        q.push_front(1);
        q.push_back(2);
        q.clear();
        assert_eq!(q.capacity(), 0, "clear");
        q.push_back(1);
        let _ = q.take_all().count();
        assert_eq!(q.capacity(), 0, "take_all");
    }

    #[test]
    fn is_one_pointer_inline() {
        assert_eq!(
            std::mem::size_of::<Fifo<[u8; 64]>>(),
            std::mem::size_of::<usize>()
        );
    }
}
