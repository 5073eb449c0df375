//! Transaction serialization: two writers' transactions both survive, and
//! generations strictly increase.
#![cfg(topos_loom)]

use loom::thread;
use std::sync::{Arc, Mutex};
use topos_loom_tests::model::{layout, small};
use topos_runtime::{ListenerResult, MemoryListener, Topology};

/// Records the generation of every commit it sees.
struct Gens(Mutex<Vec<u64>>, Topology);
impl MemoryListener for Gens {
    fn commit(&self) -> ListenerResult {
        self.0.lock().unwrap().push(self.1.generation());
        Ok(())
    }
}

#[test]
fn two_writers_both_survive_with_increasing_generations() {
    loom::model(|| {
        let (topo, root, asp) = small().unwrap();
        let g0 = topo.generation();
        let gens = Arc::new(Gens(Mutex::new(Vec::new()), topo.clone()));
        let id = topo.listener_register(gens.clone(), 0, Some(&asp)).unwrap();
        gens.0.lock().unwrap().clear();
        let spawn = |name: &'static str, addr: u64| {
            let topo = topo.clone();
            let root = root.clone();
            thread::spawn(move || {
                let r = topo.new_ram(name, 0x1000).unwrap();
                topo.begin().unwrap();
                root.add_subregion(addr, &r).unwrap();
                r.set_readonly(true).unwrap();
                topo.commit().unwrap();
            })
        };
        let t1 = spawn("x", 0x1000);
        let t2 = spawn("y", 0x3000);
        t1.join().unwrap();
        t2.join().unwrap();
        assert_eq!(layout(&asp), vec![(0x1000, "x".to_string()), (0x3000, "y".to_string())]);
        assert!(asp.view().ranges().iter().all(|r| r.readonly()));
        assert_eq!(*gens.0.lock().unwrap(), vec![g0 + 1, g0 + 2]);
        assert_eq!(topo.generation(), g0 + 2);
        // The listener holds a topology handle; break the cycle.
        topo.listener_unregister(id).unwrap();
    });
}
