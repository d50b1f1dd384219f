//! Where a forward pass spends its time: each call of Kiln's layer functions (linear layers,
//! convolutions, attention, GroupNorms, activations) timed by kind and by shape while
//! [`profile`] runs a closure, as `kiln bench --profile` reports it. The FLOPs of the recorded
//! calls add up to the models' own counts (`flops` methods, [`crate::flops`]).
//!
//! The clock starts when the call begins and stops when it returns, so the times are the work's
//! only on backends that compute an op before returning it (flex, ndarray: see
//! [`crate::device::runs_synchronously`]); on wgpu and CUDA an op returns once it is queued.
//! Calls are recorded on the thread that runs [`profile`] (the models call their layers there;
//! the kernels' own threads are inside the calls), the outermost call only where one of these
//! functions calls another (a 1x1 convolution written in place falls back to [`conv2d`]), so
//! no time is counted twice. What the recorded calls leave of a run's time (residual additions,
//! layout copies, LayerNorms, embeddings) is the caller's "other".
//!
//! Outside [`profile`] the cost is one thread-local read per call.
//!
//! [`conv2d`]: crate::conv::conv2d

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Instant;

/// The kinds of op [`profile`] tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// [`crate::linear::linear`].
    Linear,
    /// Convolutions ([`crate::conv`]), with a GroupNorm and SiLU folded in
    /// ([`crate::conv::group_norm_act_conv2d`]) or after a nearest x2 upsampling
    /// ([`crate::resampling::Upsample2D`]).
    Conv,
    /// Attention's `softmax(Q K^T / sqrt(d)) V`, without its projections (those are
    /// [`OpKind::Linear`]).
    Attention,
    /// GroupNorms ([`crate::normalization`]), with their activation where it is fused.
    Norm,
    /// Activations and GEGLU's gating ([`crate::activation`]).
    Activation,
}

impl OpKind {
    /// Every kind, in the order reports list them.
    pub const ALL: [OpKind; 5] = [
        OpKind::Linear,
        OpKind::Conv,
        OpKind::Attention,
        OpKind::Norm,
        OpKind::Activation,
    ];

    /// The kind's name in reports: `linear`, `conv`, `attention`, `norm`, `activation`.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Linear => "linear",
            OpKind::Conv => "conv",
            OpKind::Attention => "attention",
            OpKind::Norm => "norm",
            OpKind::Activation => "activation",
        }
    }
}

/// The calls of one op at one shape during a [`profile`].
#[derive(Debug, Clone, PartialEq)]
pub struct OpTiming {
    /// What kind of op.
    pub kind: OpKind,
    /// The op and its shapes, e.g. `[2, 4096, 320] -> 2560` (a linear layer's input and
    /// output features), `3x3 [2, 320, 64, 64] -> 320` (a convolution), `2x8x4096x4096x40`
    /// (attention: batch, heads, queries, keys, head width).
    pub op: String,
    /// How many times it was called.
    pub calls: u64,
    /// Seconds spent in those calls.
    pub seconds: f64,
    /// Their FLOPs, as [`crate::flops`] counts them (0 for norms and activations).
    pub flops: u64,
}

/// Totals of one [`OpKind`] in a [`Profile`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KindTotal {
    /// The kind.
    pub kind: OpKind,
    /// Calls of every op of the kind.
    pub calls: u64,
    /// Seconds in those calls.
    pub seconds: f64,
    /// Their FLOPs.
    pub flops: u64,
}

/// What [`profile`] recorded: every op and shape called, the longest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    /// One entry per (kind, op), by decreasing time.
    pub ops: Vec<OpTiming>,
}

impl Profile {
    /// The totals of each kind that was called, in [`OpKind::ALL`]'s order.
    pub fn kinds(&self) -> Vec<KindTotal> {
        OpKind::ALL
            .into_iter()
            .filter_map(|kind| {
                let ops = self.ops.iter().filter(|o| o.kind == kind);
                let total = ops.fold(
                    KindTotal {
                        kind,
                        calls: 0,
                        seconds: 0.0,
                        flops: 0,
                    },
                    |t, o| KindTotal {
                        calls: t.calls + o.calls,
                        seconds: t.seconds + o.seconds,
                        flops: t.flops + o.flops,
                        ..t
                    },
                );
                (total.calls > 0).then_some(total)
            })
            .collect()
    }

    /// Seconds in every recorded call.
    pub fn seconds(&self) -> f64 {
        self.ops.iter().map(|o| o.seconds).sum()
    }
}

/// The calls recorded so far by the innermost running [`profile`] of a thread: calls, seconds
/// and FLOPs by (kind, op).
#[derive(Default)]
struct Recorder(HashMap<(OpKind, String), (u64, f64, u64)>);

impl Recorder {
    fn add(&mut self, kind: OpKind, op: String, (calls, seconds, flops): (u64, f64, u64)) {
        let totals = self.0.entry((kind, op)).or_default();
        totals.0 += calls;
        totals.1 += seconds;
        totals.2 += flops;
    }
}

thread_local! {
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
    /// Recorded calls running on this thread: a call inside another is not recorded.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f` with the calls of Kiln's layer functions on this thread timed, and returns what
/// it returns with the [`Profile`] of those calls.
///
/// A `profile` inside another records its calls for both: the inner one returns them, and the
/// outer one's profile includes them.
pub fn profile<T>(f: impl FnOnce() -> T) -> (T, Profile) {
    let outer = RECORDER.with_borrow_mut(|r| r.replace(Recorder::default()));
    // restores the outer recorder and returns this one's calls, also if `f` unwinds
    struct Restore(Option<Option<Recorder>>);
    impl Restore {
        /// This profile's calls, the outer recorder back in place (the first time only).
        fn finish(&mut self) -> Recorder {
            match self.0.take() {
                Some(outer) => RECORDER
                    .with_borrow_mut(|r| std::mem::replace(r, outer))
                    .unwrap_or_default(),
                None => Recorder::default(),
            }
        }
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            self.finish();
        }
    }
    let mut restore = Restore(Some(outer));
    let out = f();
    let mine = restore.finish();
    RECORDER.with_borrow_mut(|r| {
        if let Some(outer) = r {
            for ((kind, op), totals) in &mine.0 {
                outer.add(*kind, op.clone(), *totals);
            }
        }
    });
    let mut ops: Vec<OpTiming> = mine
        .0
        .into_iter()
        .map(|((kind, op), (calls, seconds, flops))| OpTiming {
            kind,
            op,
            calls,
            seconds,
            flops,
        })
        .collect();
    // the longest first; ties (in name order) so that the order does not depend on the map's
    ops.sort_by(|a, b| {
        b.seconds
            .total_cmp(&a.seconds)
            .then_with(|| (a.kind, &a.op).cmp(&(b.kind, &b.op)))
    });
    (out, Profile { ops })
}

/// Runs `call`, timed as one call of `kind` where a [`profile`] is running on this thread and
/// no recorded call is (`describe` then names the op and counts its FLOPs, before `call`). Kiln's
/// layer functions call it; a model's own ops (CLIP's causal attention) can too.
pub fn timed<T>(
    kind: OpKind,
    describe: impl FnOnce() -> (String, u64),
    call: impl FnOnce() -> T,
) -> T {
    timed_if(kind, describe, call, |_| true)
}

/// [`timed`] for a call that may decline (`None`: the caller then computes the op another
/// way, whose calls are recorded instead): recorded only where it returns `Some`.
pub(crate) fn timed_some<T>(
    kind: OpKind,
    describe: impl FnOnce() -> (String, u64),
    call: impl FnOnce() -> Option<T>,
) -> Option<T> {
    timed_if(kind, describe, call, Option::is_some)
}

/// [`timed`], recording the call only where `keep` holds for what it returns.
fn timed_if<T>(
    kind: OpKind,
    describe: impl FnOnce() -> (String, u64),
    call: impl FnOnce() -> T,
    keep: impl FnOnce(&T) -> bool,
) -> T {
    let recording = DEPTH.get() == 0 && RECORDER.with_borrow(|r| r.is_some());
    if !recording {
        return call();
    }
    let (op, flops) = describe();
    // counts this call as running until it returns or unwinds
    struct Running;
    impl Drop for Running {
        fn drop(&mut self) {
            DEPTH.set(DEPTH.get() - 1);
        }
    }
    DEPTH.set(DEPTH.get() + 1);
    let running = Running;
    let start = Instant::now();
    let out = call();
    let seconds = start.elapsed().as_secs_f64();
    drop(running);
    if keep(&out) {
        RECORDER.with_borrow_mut(|r| {
            if let Some(r) = r {
                r.add(kind, op, (1, seconds, flops));
            }
        });
    }
    out
}

/// `[2, 320, 64, 64]`: a tensor's dimensions as reports write them.
pub(crate) fn dims(dims: &[usize]) -> String {
    format!("{dims:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, name: &str) -> u32 {
        timed(kind, || (name.to_string(), 10), || 7)
    }

    #[test]
    fn records_calls_by_kind_and_op_and_nothing_outside() {
        // outside a profile: nothing is recorded, and the call still runs
        assert_eq!(op(OpKind::Linear, "a"), 7);
        let ((), recorded) = profile(|| {
            op(OpKind::Linear, "a");
            op(OpKind::Linear, "a");
            op(OpKind::Conv, "b");
            timed(
                OpKind::Attention,
                || ("c".into(), 5),
                || std::thread::sleep(std::time::Duration::from_millis(20)),
            );
        });
        assert_eq!(recorded.ops.len(), 3);
        // the longest first
        assert_eq!(recorded.ops[0].op, "c");
        assert!(recorded.ops[0].seconds >= 0.02, "{:?}", recorded.ops[0]);
        let a = recorded.ops.iter().find(|o| o.op == "a").unwrap();
        assert_eq!((a.kind, a.calls, a.flops), (OpKind::Linear, 2, 20));
        let kinds = recorded.kinds();
        let names: Vec<_> = kinds.iter().map(|k| k.kind).collect();
        assert_eq!(names, [OpKind::Linear, OpKind::Conv, OpKind::Attention]);
        assert_eq!(kinds[0].calls, 2);
        assert!((recorded.seconds() - kinds.iter().map(|k| k.seconds).sum::<f64>()).abs() < 1e-12);
        // the recorder is gone with the profile
        let ((), empty) = profile(|| {});
        assert!(empty.ops.is_empty());
    }

    #[test]
    fn a_call_inside_a_recorded_call_is_not_counted_again() {
        let (_, recorded) = profile(|| {
            timed(
                OpKind::Conv,
                || ("outer".into(), 1),
                || op(OpKind::Conv, "inner"),
            )
        });
        assert_eq!(recorded.ops.len(), 1);
        assert_eq!(
            (recorded.ops[0].op.as_str(), recorded.ops[0].calls),
            ("outer", 1)
        );
        // and the depth is back to zero after it
        let (_, again) = profile(|| op(OpKind::Conv, "inner"));
        assert_eq!(again.ops[0].op, "inner");
    }

    #[test]
    fn a_call_that_declines_is_not_recorded() {
        let (_, recorded) = profile(|| {
            assert_eq!(
                timed_some(OpKind::Conv, || ("no".into(), 1), || None::<u8>),
                None
            );
            assert_eq!(
                timed_some(OpKind::Conv, || ("yes".into(), 1), || Some(1)),
                Some(1)
            );
        });
        let ops: Vec<_> = recorded.ops.iter().map(|o| o.op.as_str()).collect();
        assert_eq!(ops, ["yes"]);
    }

    #[test]
    fn an_inner_profile_returns_its_calls_and_the_outer_one_has_them_too() {
        let (inner, outer) = profile(|| {
            op(OpKind::Linear, "before");
            let ((), inner) = profile(|| {
                op(OpKind::Norm, "inside");
            });
            op(OpKind::Linear, "after");
            inner
        });
        let names = |p: &Profile| {
            let mut n: Vec<_> = p.ops.iter().map(|o| o.op.clone()).collect();
            n.sort();
            n
        };
        assert_eq!(names(&inner), ["inside"]);
        assert_eq!(names(&outer), ["after", "before", "inside"]);
    }

    #[test]
    fn a_profile_that_unwinds_leaves_no_recorder_behind() {
        let unwound = std::panic::catch_unwind(|| {
            profile(|| {
                timed(
                    OpKind::Linear,
                    || ("x".into(), 0),
                    || panic!("inside the op"),
                );
            })
        });
        assert!(unwound.is_err());
        assert!(RECORDER.with_borrow(|r| r.is_none()));
        assert_eq!(DEPTH.get(), 0);
    }
}
