//! Demo data: vehicle categories, online drivers with vehicles (spread over the
//! categories round-robin), customers, and pending trips offered to drivers of their
//! category. Sharded ([`seed_shards`]): the counts split over the shards, each shard its
//! own categories, drivers, customers (at least one each when any are asked for) and trips
//! offered to its own drivers; every row says its shard.

use serde::Serialize;

use crate::domain::{LatLng, Receiver, TripType};
use crate::storage::Storage;
use crate::storage::shards::Shards;
use crate::storage::trips::NewTrip;
use crate::storage::users::NewDriver;

/// How much to create.
#[derive(Debug, Clone, Copy)]
pub struct SeedPlan {
    /// Drivers.
    pub drivers: usize,
    /// Customers.
    pub customers: usize,
    /// Pending trips.
    pub trips: usize,
}

impl SeedPlan {
    /// The rows [`seed`] creates for this plan, one `progress` call each: two categories,
    /// the drivers, the customers (one at least when there are trips), the trips.
    pub fn rows(&self) -> usize {
        2 + self.drivers + self.customers.max(usize::from(self.trips > 0)) + self.trips
    }

    /// The plan of each of `shards` shards ([`seed_shards`]): each count split evenly,
    /// customers at least one per shard when any are asked for.
    pub fn split(&self, shards: usize) -> Vec<SeedPlan> {
        let n = shards.max(1);
        let share = |total: usize, i: usize| total / n + usize::from(i < total % n);
        (0..n)
            .map(|i| SeedPlan {
                drivers: share(self.drivers, i),
                customers: if self.customers > 0 {
                    share(self.customers, i).max(1)
                } else {
                    0
                },
                trips: share(self.trips, i),
            })
            .collect()
    }
}

/// A created category.
#[derive(Debug, Clone, Serialize)]
pub struct SeededCategory {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// The shard it lives on (sharded only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<usize>,
}

/// A created driver.
#[derive(Debug, Clone, Serialize)]
pub struct SeededDriver {
    /// Id.
    pub id: String,
    /// Their vehicle's category.
    pub vehicle_category_id: String,
    /// Their vehicle.
    pub vehicle_id: String,
    /// The shard they live on (sharded only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<usize>,
}

/// A created id.
#[derive(Debug, Clone, Serialize)]
pub struct SeededId {
    /// Id.
    pub id: String,
    /// The shard it lives on (sharded only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<usize>,
}

/// Everything created (`seed --json`).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Seeded {
    /// Vehicle categories (at least two).
    pub vehicle_categories: Vec<SeededCategory>,
    /// Drivers, online and available.
    pub drivers: Vec<SeededDriver>,
    /// Customers.
    pub customers: Vec<SeededId>,
    /// Pending trips.
    pub trips: Vec<SeededId>,
}

/// Centre of the demo city (Dhaka, where DriveMond is deployed).
const CENTRE: LatLng = LatLng {
    lat: 23.8103,
    lng: 90.4125,
};

fn near(i: usize, spread: f64) -> LatLng {
    let angle = i as f64 * 2.399_963; // golden angle: points spread evenly
    let r = spread * ((i % 97) as f64 / 97.0).sqrt();
    LatLng {
        lat: CENTRE.lat + r * angle.sin(),
        lng: CENTRE.lng + r * angle.cos(),
    }
}

/// Creates the data of `plan`, calling `progress` after each row.
pub async fn seed(store: &Storage, plan: SeedPlan, mut progress: impl FnMut()) -> Result<Seeded, sqlx::Error> {
    let mut out = Seeded::default();
    for name in ["Standard", "Premium"] {
        let id = store.vehicle_category_named(name).await?;
        out.vehicle_categories.push(SeededCategory {
            id,
            name: name.into(),
            shard: None,
        });
        progress();
    }
    for i in 0..plan.drivers {
        let category = &out.vehicle_categories[i % out.vehicle_categories.len()];
        let (id, vehicle_id) = store
            .create_driver(&NewDriver {
                name: format!("Driver {i}"),
                phone: format!("+8801{:09}", i),
                vehicle_category_id: category.id.clone(),
                online: true,
                position: near(i, 0.05),
            })
            .await?;
        out.drivers.push(SeededDriver {
            id,
            vehicle_category_id: category.id.clone(),
            vehicle_id,
            shard: None,
        });
        progress();
    }
    for i in 0..plan.customers.max(usize::from(plan.trips > 0)) {
        let id = store
            .create_customer(&format!("Customer {i}"), &format!("+8802{:09}", i))
            .await?;
        out.customers.push(SeededId { id, shard: None });
        progress();
    }
    // Each category's drivers, gathered once.
    let mut by_category: std::collections::HashMap<&str, Vec<&String>> = std::collections::HashMap::new();
    for d in &out.drivers {
        by_category
            .entry(d.vehicle_category_id.as_str())
            .or_default()
            .push(&d.id);
    }
    for i in 0..plan.trips {
        let category = &out.vehicle_categories[i % out.vehicle_categories.len()];
        // Up to five drivers of its category, starting further along for each trip and
        // wrapping round: every trip is offered to someone while its category has drivers.
        let fitting = by_category.get(category.id.as_str()).map_or(&[][..], Vec::as_slice);
        let offered_to: Vec<String> = fitting
            .iter()
            .cycle()
            .skip(if fitting.is_empty() { 0 } else { i % fitting.len() })
            .take(fitting.len().min(5))
            .map(|id| (*id).clone())
            .collect();
        let parcel = i % 5 == 4;
        let trip = NewTrip {
            customer_id: out.customers[i % out.customers.len()].id.clone(),
            vehicle_category_id: category.id.clone(),
            trip_type: if parcel { TripType::Parcel } else { TripType::Ride },
            estimated_fare_cents: 25_000 + (i as i64 % 50) * 500,
            offered_to,
            pickup: near(i + 11, 0.03),
            destination: near(i + 57, 0.08),
            receiver: parcel.then(|| Receiver {
                name: format!("Receiver {i}"),
                phone: format!("+8803{:09}", i),
            }),
            bid_on_fare: false,
        };
        match store.create_trip(&trip).await? {
            Ok(id) => out.trips.push(SeededId { id, shard: None }),
            Err(field) => return Err(sqlx::Error::Protocol(format!("seed trip refused: {field}"))),
        }
        progress();
    }
    Ok(out)
}

/// [`seed`] over `shards`: each count split evenly (customers: at least one per shard when
/// any are asked for), each shard seeded on its own, every row tagged with its shard when
/// there are several.
pub async fn seed_shards(shards: &Shards, plan: SeedPlan, mut progress: impl FnMut()) -> Result<Seeded, sqlx::Error> {
    if shards.len() <= 1 {
        return seed(&shards.all()[0], plan, progress).await;
    }
    let mut out = Seeded::default();
    for (i, (store, part)) in shards.all().iter().zip(plan.split(shards.len())).enumerate() {
        let mut seeded = seed(store, part, &mut progress).await?;
        let shard = Some(i);
        seeded.vehicle_categories.iter_mut().for_each(|c| c.shard = shard);
        seeded.drivers.iter_mut().for_each(|d| d.shard = shard);
        seeded.customers.iter_mut().for_each(|c| c.shard = shard);
        seeded.trips.iter_mut().for_each(|t| t.shard = shard);
        out.vehicle_categories.extend(seeded.vehicle_categories);
        out.drivers.extend(seeded.drivers);
        out.customers.extend(seeded.customers);
        out.trips.extend(seeded.trips);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The progress bar's length is the rows of every shard's part: with customers at
    /// least one per shard and two categories each, more than the plan's own rows.
    #[test]
    fn a_plan_splits_over_shards_with_every_row_counted() {
        let plan = SeedPlan {
            drivers: 10,
            customers: 1,
            trips: 7,
        };
        assert_eq!(plan.rows(), 2 + 10 + 1 + 7);
        assert_eq!(plan.split(1).iter().map(SeedPlan::rows).sum::<usize>(), plan.rows());
        let parts = plan.split(3);
        let drivers: Vec<usize> = parts.iter().map(|p| p.drivers).collect();
        let trips: Vec<usize> = parts.iter().map(|p| p.trips).collect();
        assert_eq!((drivers, trips), (vec![4, 3, 3], vec![3, 2, 2]));
        assert!(parts.iter().all(|p| p.customers == 1));
        assert_eq!(parts.iter().map(SeedPlan::rows).sum::<usize>(), 3 * 2 + 10 + 3 + 7);
        let no_customers = SeedPlan {
            drivers: 2,
            customers: 0,
            trips: 0,
        };
        assert!(no_customers.split(2).iter().all(|p| p.customers == 0 && p.rows() == 3));
    }
}
