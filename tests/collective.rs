//! The collective double: ranks as threads over separate interpreter memories, reduced in rank order.

use half::bf16;
use small4::device::collective::{ranks_like, Collective, ThreadCollective};
use small4::device::DeviceBuffer;

#[test]
fn thread_ranks_all_reduce_and_all_gather_like_nccl() {
    let world = 3;
    let ranks = ThreadCollective::group(world).unwrap();
    let devices = ranks_like(&small4::device::simulator(), world).unwrap();
    let results: Vec<(Vec<f32>, Vec<bf16>)> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .zip(&devices)
            .map(|(comm, device)| {
                s.spawn(move || {
                    let r = comm.rank() as f32;
                    let sums = DeviceBuffer::from_slice(device, &[r + 0.5, 10.0 * r - 1.5]).unwrap();
                    comm.all_reduce_sum_f32(&sums).unwrap();
                    let mine = DeviceBuffer::from_slice(device, &[bf16::from_f32(r + 0.25); 2]).unwrap();
                    let all = DeviceBuffer::<bf16>::alloc(device, 2 * world).unwrap();
                    comm.all_gather_bf16(&mine, &all).unwrap();
                    (sums.to_vec().unwrap(), all.to_vec().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (sums, gathered) in &results {
        assert_eq!(sums, &vec![0.5 + 1.5 + 2.5, -1.5 + 8.5 + 18.5]);
        let want: Vec<bf16> = (0..world).flat_map(|r| [bf16::from_f32(r as f32 + 0.25); 2]).collect();
        assert_eq!(gathered, &want);
    }
}

#[test]
fn mismatched_gather_output_is_a_shape_error() {
    let ranks = ThreadCollective::group(1).unwrap();
    let device = &small4::device::simulator();
    let send = DeviceBuffer::<bf16>::alloc(device, 4).unwrap();
    let out = DeviceBuffer::<bf16>::alloc(device, 3).unwrap();
    assert!(matches!(ranks[0].all_gather_bf16(&send, &out), Err(small4::Error::Shape { .. })));
    assert!(ThreadCollective::group(0).is_err());
}
