//! Faults: things that went wrong inside the topology that the caller of the
//! moment may not own — a listener that failed during someone's commit, a
//! transaction whose thread went away. Each is returned to the caller where
//! there is one (as an [`Error`](crate::Error)), and also kept in a short log
//! and passed to a hook, so that an embedder (a VM that must stop when its
//! KVM memslot mirror fails) learns of it whoever triggered it.

use crate::listener::ListenerId;
use crate::sync::{Arc, Mutex, Weak};
use crate::topology::Topology;
use std::collections::VecDeque;

/// How many faults [`Topology::faults`] keeps.
const KEPT: usize = 64;

/// A listener callback failed (returned an error or panicked). The listener
/// was detached: it gets no further callbacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerFailure {
    /// The listener.
    pub listener: ListenerId,
    /// The callback that failed (`"region_add"`, `"log_sync"`...).
    pub callback: &'static str,
    /// The error's message, or the panic's.
    pub message: String,
    /// The generation of the commit it failed in (the current generation
    /// for failures outside a commit).
    pub generation: u64,
}

impl std::fmt::Display for ListenerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "listener {} failed in {} at generation {}: {}",
            self.listener.0, self.callback, self.generation, self.message
        )
    }
}

/// A fault of the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// A listener failed and was detached.
    ListenerFailed(ListenerFailure),
    /// A thread ended (or unwound out of its last frame) inside a
    /// transaction. The next thread that needed the topology committed what
    /// the transaction had changed, at `generation`.
    TransactionAbandoned {
        /// The generation of the commit that completed it.
        generation: u64,
    },
}

/// Called with every fault, on the thread that detected it.
pub type FaultHook = Arc<dyn Fn(&Fault) + Send + Sync>;

/// The hook as the topology holds it.
type WeakFaultHook = Weak<dyn Fn(&Fault) + Send + Sync>;

/// The recent faults and the hook.
#[derive(Default)]
pub(crate) struct FaultLog {
    recent: Mutex<VecDeque<Fault>>,
    hook: Mutex<Option<WeakFaultHook>>,
}

impl FaultLog {
    pub(crate) fn report(&self, fault: Fault) {
        match &fault {
            Fault::ListenerFailed(f) => tracing::error!(%f, "memory listener failed and was detached"),
            Fault::TransactionAbandoned { generation } => {
                tracing::error!(generation, "a transaction was abandoned by its thread; its changes were committed")
            }
        }
        {
            let mut r = self.recent.lock();
            if r.len() == KEPT {
                r.pop_front();
            }
            r.push_back(fault.clone());
        }
        let hook = self.hook.lock().as_ref().and_then(Weak::upgrade);
        if let Some(h) = hook {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h(&fault))).is_err() {
                tracing::error!("the fault hook panicked");
            }
        }
    }
}

impl Topology {
    /// The most recent faults (up to 64), oldest first.
    pub fn faults(&self) -> Vec<Fault> {
        self.fault_log().recent.lock().iter().cloned().collect()
    }

    /// Installs the hook called with every fault (or removes it). The
    /// topology holds it weakly, so that a hook may refer to the topology
    /// without keeping it alive: keep the `Arc` for as long as the hook
    /// should run.
    pub fn set_fault_hook(&self, hook: Option<&FaultHook>) {
        *self.fault_log().hook.lock() = hook.map(Arc::downgrade);
    }
}
