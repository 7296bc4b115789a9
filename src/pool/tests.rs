use super::*;

fn bids<R>(batches: &[Batch<R>]) -> Vec<Bid> {
    batches.iter().map(|b| b.bid).collect()
}

#[test]
fn budget_starts_at_one_then_follows_the_latest_batch() {
    let mut l = Ledger::new(2, false);
    assert_eq!(l.budget(), 1);
    let b = l.record(0, 1, ());
    l.complete(b, 0.001).unwrap();
    assert_eq!(l.budget(), 5); // 5 ms of work at 1 ms per item
    let b = l.record(0, 10, ());
    l.complete(b, 10.0 / 131_072.0).unwrap(); // 2^-17 s per item: 0.005 s is 655.36 items
    assert_eq!(l.budget(), 655);
    let b = l.record(1, 100, ());
    l.complete(b, 0.0).unwrap(); // too fast to measure: capped, not a division by zero
    assert_eq!(l.budget(), MAX_BATCH_ITEMS);
    let b = l.record(1, 1, ());
    l.complete(b, 1.0).unwrap(); // slow tasks: never below one item
    assert_eq!(l.budget(), 1);
}

#[test]
fn single_keeps_one_item_per_batch() {
    let mut l = Ledger::new(1, true);
    let b = l.record(0, 1, ());
    l.complete(b, 1e-6).unwrap();
    assert_eq!(l.budget(), 1);
    assert!(l.item_cost().is_some());
}

#[test]
fn batches_without_items_leave_the_cost_alone() {
    let mut l = Ledger::new(1, false);
    let b = l.record(0, 0, ());
    l.complete(b, 3.0).unwrap();
    assert_eq!(l.item_cost(), None);
}

#[test]
fn next_slot_fills_the_emptiest_live_worker_up_to_the_credit() {
    let mut l = Ledger::new(3, false);
    assert_eq!(l.next_slot([0, 1, 2]), Some(0));
    l.record(0, 1, ());
    assert_eq!(l.next_slot([0, 1, 2]), Some(1));
    l.record(1, 1, ());
    // Slot 2 has no worker: never chosen.
    assert_eq!(l.next_slot([0, 1]), Some(0));
    l.record(0, 1, ());
    assert_eq!(l.next_slot([0, 1]), Some(1));
    l.record(1, 1, ());
    assert_eq!(l.next_slot([0, 1]), None);
    // Out-of-range slots are ignored rather than panicking.
    assert_eq!(l.next_slot([7]), None);
}

#[test]
fn complete_takes_the_batch_out_once() {
    let mut l = Ledger::new(2, false);
    let a = l.record(0, 2, "a");
    let b = l.record(0, 3, "b");
    let c = l.record(1, 4, "c");
    assert!(!l.is_idle());
    // Answers may come out of order across workers.
    assert_eq!(l.complete(c, 0.1).unwrap().recs, "c");
    assert_eq!(l.complete(b, 0.1).unwrap().recs, "b");
    assert!(l.complete(b, 0.1).is_none());
    assert!(l.complete(99, 0.1).is_none());
    assert_eq!(l.held(0), 1);
    assert_eq!(l.complete(a, 0.1).unwrap().items, 2);
    assert!(l.is_idle());
}

#[test]
fn lost_returns_what_the_dead_worker_had_taken() {
    let mut l = Ledger::new(2, false);
    let a = l.record(0, 1, ());
    let b = l.record(0, 1, ());
    let other = l.record(1, 1, ());
    // One message still queued: the newest batch stays for the replacement.
    let lost = l.lost(0, 1);
    assert_eq!(bids(&lost), vec![a]);
    assert_eq!(l.batches(0).map(|x| x.bid).collect::<Vec<_>>(), vec![b]);
    // Its answer is no longer expected; the survivor's still is.
    assert!(l.complete(a, 0.1).is_none());
    assert!(l.complete(other, 0.1).is_some());
    // A queue holding more messages than the ledger knows of loses nothing.
    assert!(l.lost(0, 5).is_empty());
    assert_eq!(bids(&l.lost(0, 0)), vec![b]);
    assert!(l.is_idle());
    assert!(l.lost(9, 0).is_empty());
}

#[test]
fn clear_returns_everything_outstanding() {
    let mut l = Ledger::new(2, false);
    let a = l.record(0, 1, ());
    let b = l.record(1, 1, ());
    let mut all = bids(&l.clear());
    all.sort_unstable();
    assert_eq!(all, vec![a, b]);
    assert!(l.is_idle());
    assert_eq!(l.next_slot([0, 1]), Some(0));
    assert!(l.complete(a, 0.1).is_none());
}
