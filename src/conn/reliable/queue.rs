//! Bounded byte queues between the two sides of a reliable session, one per direction.
//!
//! Owns the bound and what happens at it; the session decides *when* to push and pop.
//!
//! Invariants:
//! - The queued byte count never exceeds `max_bytes`: a push that would cross it either makes
//!   room by shedding the oldest sheddable items (superseded status reports) or is refused
//!   whole. Items are never split or merged here, so one device read stays one upstream write.
//! - The depth gauge always equals the bytes held: it is adjusted on every push, pop and shed,
//!   and whatever is still queued is subtracted when the queue is dropped.
//! - An item taken for writing ([`BoundedQueue::take_front`]) still counts against the bound
//!   until its write is confirmed ([`BoundedQueue::release_in_flight`]); if the write fails it
//!   goes back to the front ([`BoundedQueue::return_in_flight`]), so nothing is lost and the
//!   bound still holds. Shedding never touches it.

use bytes::Bytes;
use prometheus::IntGauge;

use crate::conn::fifo::Fifo;

/// One queued write.
#[derive(Clone, PartialEq, Eq)]
pub struct Item {
    pub bytes: Bytes,
    /// May be dropped to make room: the item holds only status reports (0x83/0x43), which the
    /// device repeats on the next state change, so a newer one supersedes it.
    pub sheddable: bool,
    /// Device heartbeats (0xd3) in the item, and how many of them the gateway has already
    /// answered itself (upstream resumption): the upstream's answers to those are duplicates.
    pub heartbeats: u32,
    pub answered: u32,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Device bytes may hold an auth code: sizes only.
        f.debug_struct("Item")
            .field("len", &self.bytes.len())
            .field("sheddable", &self.sheddable)
            .field("heartbeats", &self.heartbeats)
            .field("answered", &self.answered)
            .finish()
    }
}

impl Item {
    /// An item of plain frames: not sheddable, no heartbeats.
    pub fn frames(bytes: Bytes) -> Item {
        Item {
            bytes,
            sheddable: false,
            heartbeats: 0,
            answered: 0,
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Queued after dropping this many older sheddable items.
    Shed(usize),
    /// Refused: no room, even after shedding whatever could be shed.
    Full,
}

#[derive(Debug)]
pub struct BoundedQueue {
    items: Fifo<Item>,
    /// Taken for writing, not yet confirmed written.
    in_flight: Option<Item>,
    /// Bytes of `items` and `in_flight`.
    bytes: usize,
    max_bytes: usize,
    gauge: IntGauge,
}

fn as_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl BoundedQueue {
    pub fn new(max_bytes: usize, gauge: IntGauge) -> Self {
        Self {
            items: Fifo::new(),
            in_flight: None,
            bytes: 0,
            max_bytes,
            gauge,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes that can still be pushed.
    pub fn room(&self) -> usize {
        self.max_bytes.saturating_sub(self.bytes)
    }

    pub fn push(&mut self, item: Item) -> Pushed {
        let len = item.bytes.len();
        if len > self.max_bytes {
            return Pushed::Full;
        }
        let mut shed = 0;
        if self.bytes + len > self.max_bytes {
            // Only shed if that actually makes enough room; otherwise keep everything and refuse.
            let sheddable: usize = self
                .items
                .iter()
                .filter(|i| i.sheddable)
                .map(|i| i.bytes.len())
                .sum();
            if self.bytes - sheddable + len > self.max_bytes {
                return Pushed::Full;
            }
            while self.bytes + len > self.max_bytes {
                let Some(pos) = self.items.iter().position(|i| i.sheddable) else {
                    return Pushed::Full;
                };
                if let Some(old) = self.items.remove(pos) {
                    self.bytes -= old.bytes.len();
                    self.gauge.sub(as_i64(old.bytes.len()));
                    shed += 1;
                }
            }
        }
        self.bytes += len;
        self.gauge.add(as_i64(len));
        self.items.push_back(item);
        if shed > 0 {
            Pushed::Shed(shed)
        } else {
            Pushed::Queued
        }
    }

    /// Nothing queued and nothing being written.
    pub fn is_idle(&self) -> bool {
        self.items.is_empty() && self.in_flight.is_none()
    }

    /// Moves the oldest item to the in-flight slot and returns it; `None` when the queue is
    /// empty or an item is already in flight.
    pub fn take_front(&mut self) -> Option<&Item> {
        if self.in_flight.is_some() {
            return None;
        }
        self.in_flight = self.items.pop_front();
        self.in_flight.as_ref()
    }

    /// The in-flight item was written.
    pub fn release_in_flight(&mut self) {
        if let Some(item) = self.in_flight.take() {
            self.bytes -= item.bytes.len();
            self.gauge.sub(as_i64(item.bytes.len()));
        }
    }

    /// The in-flight item's write failed: it is queued again, first.
    pub fn return_in_flight(&mut self) {
        if let Some(item) = self.in_flight.take() {
            self.items.push_front(item);
        }
    }

    /// Whether `bytes` (the very buffer, not an equal one) is still queued.
    pub fn holds(&self, bytes: &Bytes) -> bool {
        self.items
            .iter()
            .any(|i| i.bytes.as_ptr() == bytes.as_ptr() && i.bytes.len() == bytes.len())
    }

    /// The queued items, oldest first, for bookkeeping that does not change their size.
    pub fn items_mut(&mut self) -> impl Iterator<Item = &mut Item> {
        self.items.iter_mut()
    }

    pub fn pop(&mut self) -> Option<Item> {
        let item = self.items.pop_front()?;
        self.bytes -= item.bytes.len();
        self.gauge.sub(as_i64(item.bytes.len()));
        Some(item)
    }

    /// Pops items while their total stays within `limit` bytes (at least one item if any), for
    /// writers that may coalesce.
    pub fn pop_up_to(&mut self, limit: usize) -> Vec<Item> {
        let mut out = Vec::new();
        let mut total = 0;
        while let Some(front) = self.items.front() {
            let len = front.bytes.len();
            if !out.is_empty() && total + len > limit {
                break;
            }
            total += len;
            if let Some(item) = self.pop() {
                out.push(item);
            }
        }
        out
    }
}

impl Drop for BoundedQueue {
    fn drop(&mut self) {
        self.gauge.sub(as_i64(self.bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: usize, sheddable: bool) -> Item {
        Item {
            sheddable,
            ..Item::frames(Bytes::from(vec![0u8; n]))
        }
    }

    fn gauge() -> IntGauge {
        IntGauge::new("q", "q").expect("gauge")
    }

    #[test]
    fn refuses_at_the_bound_and_never_exceeds_it() {
        let g = gauge();
        let mut q = BoundedQueue::new(100, g.clone());
        assert_eq!(q.push(item(60, false)), Pushed::Queued);
        assert_eq!(q.push(item(40, false)), Pushed::Queued);
        assert_eq!(q.push(item(1, false)), Pushed::Full);
        assert_eq!(q.bytes(), 100);
        assert_eq!(g.get(), 100);
        assert_eq!(q.room(), 0);
        assert_eq!(q.pop(), Some(item(60, false)));
        assert_eq!(g.get(), 40);
    }

    #[test]
    fn an_item_that_fits_exactly_is_queued_without_shedding() {
        let mut q = BoundedQueue::new(100, gauge());
        assert!(q.is_empty());
        // As large as the whole queue: fits.
        assert_eq!(q.push(item(100, true)), Pushed::Queued);
        assert!(!q.is_empty());
        assert_eq!(q.pop(), Some(item(100, true)));
        assert!(q.is_empty());
        // Filling the last byte exactly sheds nothing.
        q.push(item(60, true));
        assert_eq!(q.push(item(40, false)), Pushed::Queued);
        assert_eq!(q.len(), 2);
        // One byte too many: exactly the sheddable 60 must go, and is enough.
        q.pop();
        q.push(item(60, true));
        assert_eq!(q.bytes(), 100);
        assert_eq!(q.push(item(60, false)), Pushed::Shed(1));
        assert_eq!(q.bytes(), 100);
    }

    #[test]
    fn an_emptied_queue_holds_no_capacity_after_one_item_or_a_burst() {
        let mut q = BoundedQueue::new(1 << 20, gauge());
        q.push(item(1, false));
        assert!(q.items.capacity() > 0);
        while q.pop().is_some() {}
        assert_eq!(q.items.capacity(), 0);
        for _ in 0..256 {
            q.push(item(1, false));
        }
        assert!(q.items.capacity() >= 256);
        while q.pop().is_some() {}
        assert_eq!(q.items.capacity(), 0, "{}", q.items.capacity());
    }

    #[test]
    fn a_coalesced_write_takes_items_up_to_exactly_its_limit() {
        let mut q = BoundedQueue::new(1000, gauge());
        for n in [40, 60, 10] {
            q.push(item(n, false));
        }
        // 40 + 60 is exactly the limit: both; the 10 waits.
        let out: Vec<usize> = q.pop_up_to(100).iter().map(|i| i.bytes.len()).collect();
        assert_eq!(out, [40, 60]);
        // A first item larger than the limit still goes, alone.
        q.push(item(500, false));
        let out: Vec<usize> = q.pop_up_to(5).iter().map(|i| i.bytes.len()).collect();
        assert_eq!(out, [10]);
        let out: Vec<usize> = q.pop_up_to(5).iter().map(|i| i.bytes.len()).collect();
        assert_eq!(out, [500]);
    }

    #[test]
    fn holds_means_this_very_buffer_not_an_equal_one() {
        let mut q = BoundedQueue::new(100, gauge());
        let queued = Bytes::from(vec![7u8; 10]);
        q.push(Item::frames(queued.clone()));
        assert!(q.holds(&queued));
        assert!(!q.holds(&Bytes::from(vec![7u8; 10])), "an equal copy");
        assert!(
            !q.holds(&queued.slice(0..9)),
            "a shorter view of the same bytes"
        );
        assert!(!q.holds(&queued.slice(1..10)), "a view starting elsewhere");
        assert_eq!(q.items_mut().count(), 1);
        q.pop();
        assert!(!q.holds(&queued));
    }

    #[test]
    fn sheds_oldest_status_only_when_that_makes_room() {
        let g = gauge();
        let mut q = BoundedQueue::new(100, g.clone());
        q.push(item(30, true));
        q.push(item(30, false));
        q.push(item(30, true));
        // 90 queued; 20 more needs one shed: the oldest sheddable (first) goes.
        assert_eq!(q.push(item(20, false)), Pushed::Shed(1));
        assert_eq!(q.bytes(), 80);
        assert_eq!(q.len(), 3);
        assert!(!q.pop().expect("item").sheddable);
        // 50 queued (30 sheddable + 20); 90 more cannot fit even after shedding: nothing moves.
        assert_eq!(q.push(item(90, false)), Pushed::Full);
        assert_eq!(q.bytes(), 50);
        assert_eq!(g.get(), 50);
    }

    #[test]
    fn dropping_the_queue_returns_its_bytes_to_the_gauge() {
        let g = gauge();
        {
            let mut q = BoundedQueue::new(100, g.clone());
            q.push(item(10, false));
            q.push(item(15, false));
            assert_eq!(g.get(), 25);
        }
        assert_eq!(g.get(), 0);
    }

    #[test]
    fn an_item_in_flight_counts_until_written_and_returns_first_on_failure() {
        let g = gauge();
        let mut q = BoundedQueue::new(100, g.clone());
        q.push(item(60, true));
        q.push(item(30, false));
        assert_eq!(q.take_front().map(|i| i.bytes.len()), Some(60));
        assert!(q.take_front().is_none(), "one write at a time");
        // Still counted: 20 more do not fit, and the in-flight status cannot be shed.
        assert_eq!(q.push(item(20, true)), Pushed::Full);
        q.return_in_flight();
        assert_eq!(
            q.take_front().map(|i| i.bytes.len()),
            Some(60),
            "first again"
        );
        q.release_in_flight();
        assert_eq!((q.bytes(), g.get()), (30, 30));
        assert!(!q.is_idle());
        assert_eq!(q.take_front().map(|i| i.bytes.len()), Some(30));
        q.release_in_flight();
        assert!(q.is_idle());
    }

    #[test]
    fn pop_up_to_coalesces_within_the_limit() {
        let mut q = BoundedQueue::new(1000, gauge());
        for _ in 0..5 {
            q.push(item(100, false));
        }
        assert_eq!(q.pop_up_to(250).len(), 2);
        assert_eq!(q.pop_up_to(50).len(), 1, "at least one item");
        assert_eq!(q.pop_up_to(1000).len(), 2);
        assert!(q.is_empty());
    }
}
