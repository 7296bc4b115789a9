//! The parent side of a process pool, without Python: which batches each worker holds, which
//! worker gets the next one, and how large a batch should be.
//!
//! Every worker has its own task queue and may hold up to [`CREDIT`] batches (one running, one
//! waiting, so it never idles while the parent reacts to a result). A batch is identified by
//! a [`Bid`]; the worker sends it back with its results and how long it took, which gives the
//! cost of an item and so the next batch's size ([`Ledger::budget`]): about
//! [`BATCH_SECONDS`] of work, starting from one item while the cost is unknown.
//!
//! When a worker dies, the batches it had already taken off its queue are lost with it; the
//! ones still queued go to its replacement, which reads the same queue. The ledger knows
//! which are which from how many messages the queue still holds ([`Ledger::lost`]): batches
//! are queued in order and taken in order.
//!
//! `R` is whatever the caller attaches to a batch to deliver its results (the Python binding
//! keeps the batch's task records there).

use std::collections::{HashMap, VecDeque};

/// Batches a worker may hold at once.
pub const CREDIT: usize = 2;
/// Seconds of work aimed for per batch once the cost of an item is known.
pub const BATCH_SECONDS: f64 = 0.005;
/// Most items in one batch, however cheap they are.
pub const MAX_BATCH_ITEMS: usize = 16384;

/// A batch's identifier, unique within a pool.
pub type Bid = u64;

/// One batch sent to a worker and not yet answered.
#[derive(Debug)]
pub struct Batch<R> {
    /// Its identifier.
    pub bid: Bid,
    /// How many items (tasks) it carries: the divisor of its measured time.
    pub items: usize,
    /// What the caller attached to it.
    pub recs: R,
}

/// The batches every worker holds, and the measured cost of an item.
#[derive(Debug)]
pub struct Ledger<R> {
    /// Per worker slot, its batches, oldest (first queued) first.
    slots: Vec<VecDeque<Batch<R>>>,
    /// Which slot holds each outstanding batch.
    owner: HashMap<Bid, usize>,
    next_bid: Bid,
    /// Seconds per item of the latest measured batch.
    item_cost: Option<f64>,
    /// One item per batch, always (`maxtasksperchild` counts tasks one by one).
    single: bool,
}

impl<R> Ledger<R> {
    /// A ledger for `slots` workers; `single` keeps every batch to one item.
    #[must_use]
    pub fn new(slots: usize, single: bool) -> Self {
        Self {
            slots: (0..slots).map(|_| VecDeque::new()).collect(),
            owner: HashMap::new(),
            next_bid: 0,
            item_cost: None,
            single,
        }
    }

    /// How many worker slots there are.
    #[must_use]
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Items for the next batch: one until an item's cost is known (and always with
    /// `single`), then about [`BATCH_SECONDS`] worth, within `1..=MAX_BATCH_ITEMS`.
    #[must_use]
    pub fn budget(&self) -> usize {
        match self.item_cost {
            Some(cost) if !self.single => {
                let n = BATCH_SECONDS / cost;
                if n >= MAX_BATCH_ITEMS as f64 {
                    MAX_BATCH_ITEMS
                } else {
                    // Truncation is the intent: n is in [0, MAX_BATCH_ITEMS).
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let n = n as usize;
                    n.max(1)
                }
            }
            _ => 1,
        }
    }

    /// The measured seconds per item, once a batch with items has come back.
    #[must_use]
    pub fn item_cost(&self) -> Option<f64> {
        self.item_cost
    }

    /// The slot that should get the next batch: among those `live` says have a worker, the
    /// one holding the fewest batches, below [`CREDIT`] (the first such on a tie). `None`
    /// when every live worker holds all it may.
    pub fn next_slot(&self, live: impl IntoIterator<Item = usize>) -> Option<usize> {
        live.into_iter()
            .filter(|&i| i < self.slots.len() && self.slots[i].len() < CREDIT)
            .min_by_key(|&i| self.slots[i].len())
    }

    /// Records a batch of `items` items queued to `slot`; returns its identifier.
    ///
    /// # Panics
    /// When `slot` is out of range (a caller bug).
    pub fn record(&mut self, slot: usize, items: usize, recs: R) -> Bid {
        let bid = self.next_bid;
        self.next_bid += 1;
        self.slots[slot].push_back(Batch { bid, items, recs });
        self.owner.insert(bid, slot);
        bid
    }

    /// A worker answered batch `bid` after `seconds` of work: the batch leaves the ledger and
    /// is returned (`None` when it is not outstanding: already failed as lost, or cleared).
    /// A batch with items sets the cost of an item: the latest batch alone, so the size
    /// follows tasks that get slower at once, and grows geometrically from one item (a small
    /// batch overstates the cost per item by its fixed overhead).
    pub fn complete(&mut self, bid: Bid, seconds: f64) -> Option<Batch<R>> {
        let slot = self.owner.remove(&bid)?;
        let held = &mut self.slots[slot];
        let at = held.iter().position(|b| b.bid == bid)?;
        let batch = held.remove(at)?;
        if batch.items > 0 {
            #[allow(clippy::cast_precision_loss)] // batches hold at most MAX_BATCH_ITEMS
            let per_item = seconds / batch.items as f64;
            self.item_cost = Some(per_item.max(1e-8));
        }
        Some(batch)
    }

    /// The worker of `slot` has ended with `queued` messages still in its queue: the batches
    /// it had taken (all but the newest `queued`) leave the ledger and are returned, oldest
    /// first; the queued ones stay, for its replacement.
    pub fn lost(&mut self, slot: usize, queued: usize) -> Vec<Batch<R>> {
        let Some(held) = self.slots.get_mut(slot) else {
            return Vec::new();
        };
        let taken = held.len().saturating_sub(queued);
        let lost: Vec<_> = held.drain(..taken).collect();
        for b in &lost {
            self.owner.remove(&b.bid);
        }
        lost
    }

    /// Every outstanding batch leaves the ledger (the pool is terminated).
    pub fn clear(&mut self) -> Vec<Batch<R>> {
        self.owner.clear();
        self.slots
            .iter_mut()
            .flat_map(|held| held.drain(..))
            .collect()
    }

    /// How many batches `slot` holds.
    #[must_use]
    pub fn held(&self, slot: usize) -> usize {
        self.slots.get(slot).map_or(0, VecDeque::len)
    }

    /// The batches `slot` holds, oldest first.
    pub fn batches(&self, slot: usize) -> impl Iterator<Item = &Batch<R>> {
        self.slots.get(slot).into_iter().flatten()
    }

    /// Whether no batch is outstanding.
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.owner.is_empty()
    }
}

#[cfg(test)]
mod tests;
