// SPDX-License-Identifier: GPL-2.0-only
/*
 * snd-xen-vsnd: the xenbus side. The frontend sets up its channels when the
 * backend is waiting for them (InitWait), creates the ALSA card once the
 * backend is Connected, and removes both whenever the backend goes away, so
 * that a backend that comes back (restarted, or a new one) finds a frontend
 * ready to start over.
 *
 * Unlike a frontend that re-runs its setup on every change it sees in the
 * backend's directory, this one sets up once per InitWait: extra writes by
 * the backend while it waits do not make it throw away the rings the backend
 * may already have mapped.
 */
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/string.h>
#include <xen/xen.h>
#include <xen/xenbus.h>
#include "vsnd.h"

static void vsnd_disconnect(struct vsnd_card *vc)
{
	vsnd_card_remove(vc);
	if (vc->channels_ready)
		vsnd_channels_free(vc);
}

static void vsnd_backend_changed(struct xenbus_device *xb, enum xenbus_state be)
{
	struct vsnd_card *vc = dev_get_drvdata(&xb->dev);
	int ret;

	switch (be) {
	case XenbusStateInitWait:
		if (xb->state == XenbusStateInitialised && vc->channels_ready)
			break; /* set up already; waiting for Connected */
		vsnd_disconnect(vc);
		ret = vsnd_channels_create(vc);
		if (!ret)
			ret = vsnd_channels_publish(vc);
		if (ret) {
			vsnd_disconnect(vc);
			xenbus_dev_fatal(xb, ret, "setting up the sound channels");
			break;
		}
		xenbus_switch_state(xb, XenbusStateInitialised);
		break;

	case XenbusStateConnected:
		if (xb->state != XenbusStateInitialised || !vc->channels_ready)
			break;
		vc->backend_reports_delay =
			xenbus_read_unsigned(xb->otherend, VSND_FEATURE_DELAY, 0) == 1;
		ret = vsnd_card_create(vc);
		if (ret) {
			xenbus_dev_fatal(xb, ret, "creating the sound card");
			break;
		}
		dev_info(&xb->dev, "connected: %u streams, delay reports %s\n", vc->nstreams,
			 vc->backend_reports_delay ? "on" : "off");
		xenbus_switch_state(xb, XenbusStateConnected);
		break;

	case XenbusStateClosing:
		vsnd_disconnect(vc);
		xenbus_frontend_closed(xb);
		break;

	case XenbusStateClosed:
	case XenbusStateInitialising:
	case XenbusStateUnknown:
		/* The backend went away or started over: be ready for it. */
		vsnd_disconnect(vc);
		if (xb->state != XenbusStateInitialising)
			xenbus_switch_state(xb, XenbusStateInitialising);
		break;

	default:
		break;
	}
}

static int vsnd_probe(struct xenbus_device *xb, const struct xenbus_device_id *id)
{
	struct vsnd_card *vc;
	const char *tail;
	int ret;

	vc = devm_kzalloc(&xb->dev, sizeof(*vc), GFP_KERNEL);
	if (!vc)
		return -ENOMEM;
	vc->xb = xb;
	/* device/vsnd/<devid>: the toolstack's number, stable across boots */
	tail = strrchr(xb->nodename, '/');
	if (!tail || kstrtouint(tail + 1, 10, &vc->devid))
		vc->devid = UINT_MAX;
	dev_set_drvdata(&xb->dev, vc);
	ret = vsnd_read_config(vc);
	if (ret) {
		vsnd_free_config(vc);
		xenbus_dev_fatal(xb, ret, "reading the card configuration");
		return ret;
	}
	return xenbus_switch_state(xb, XenbusStateInitialising);
}

static void vsnd_remove(struct xenbus_device *xb)
{
	struct vsnd_card *vc = dev_get_drvdata(&xb->dev);

	vsnd_disconnect(vc);
	vsnd_free_config(vc);
}

static const struct xenbus_device_id vsnd_ids[] = {
	{ XENSND_DRIVER_NAME },
	{ "" }
};

static struct xenbus_driver vsnd_driver = {
	.ids = vsnd_ids,
	.probe = vsnd_probe,
	.remove = vsnd_remove,
	.otherend_changed = vsnd_backend_changed,
	.not_essential = true,
};

static int __init vsnd_init(void)
{
	if (!xen_domain() || xen_initial_domain())
		return -ENODEV;
	return xenbus_register_frontend(&vsnd_driver);
}

static void __exit vsnd_exit(void)
{
	xenbus_unregister_driver(&vsnd_driver);
}

module_init(vsnd_init);
module_exit(vsnd_exit);

MODULE_DESCRIPTION("Xen PV sound frontend with delay reports and mmap");
MODULE_LICENSE("GPL");
MODULE_ALIAS("xen:" XENSND_DRIVER_NAME);
