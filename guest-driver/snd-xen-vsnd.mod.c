#include <linux/module.h>
#define INCLUDE_VERMAGIC
#include <linux/build-salt.h>
#include <linux/elfnote-lto.h>
#include <linux/export-internal.h>
#include <linux/vermagic.h>
#include <linux/compiler.h>

BUILD_SALT;
BUILD_LTO_INFO;

MODULE_INFO(vermagic, VERMAGIC_STRING);
MODULE_INFO(name, KBUILD_MODNAME);

__visible struct module __this_module
__section(".gnu.linkonce.this_module") = {
	.name = KBUILD_MODNAME,
	.init = init_module,
#ifdef CONFIG_MODULE_UNLOAD
	.exit = cleanup_module,
#endif
	.arch = MODULE_ARCH_INIT,
};

#ifdef CONFIG_RETPOLINE
MODULE_INFO(retpoline, "Y");
#endif


static const struct modversion_info ____versions[]
__used __section("__versions") = {
	{ 0x7712771a, "unbind_from_irqhandler" },
	{ 0x4a3ad70e, "wait_for_completion_timeout" },
	{ 0x91c24755, "devm_kmalloc" },
	{ 0x77bc13a0, "strim" },
	{ 0x3ea7cb66, "snd_pcm_new" },
	{ 0x656e4a6e, "snprintf" },
	{ 0xa6257a2f, "complete" },
	{ 0xe630cfa1, "snd_card_register" },
	{ 0x3362b03c, "xen_p2m_size" },
	{ 0x1df342f7, "snd_card_free" },
	{ 0x608741b5, "__init_swait_queue_head" },
	{ 0x1c3b458d, "xenbus_dev_fatal" },
	{ 0xc6572a90, "xenbus_read_unsigned" },
	{ 0x84d19401, "snd_pcm_hw_constraint_minmax" },
	{ 0x731dba7a, "xen_domain_type" },
	{ 0xecd8f23d, "xenbus_read" },
	{ 0x3b6c41ea, "kstrtouint" },
	{ 0x37a0cba, "kfree" },
	{ 0x6aa2a877, "xenbus_printf" },
	{ 0x50559d97, "xenbus_switch_state" },
	{ 0x4302d0eb, "free_pages" },
	{ 0x34db050b, "_raw_spin_lock_irqsave" },
	{ 0xcbd4898c, "fortify_panic" },
	{ 0xbdfb6dbb, "__fentry__" },
	{ 0x8427cc7b, "_raw_spin_lock_irq" },
	{ 0x1d24c881, "___ratelimit" },
	{ 0xa19b956, "__stack_chk_fail" },
	{ 0xa916b694, "strnlen" },
	{ 0x7d173e99, "__free_pages" },
	{ 0xbb462483, "_dev_info" },
	{ 0xd70f58c4, "xenbus_alloc_evtchn" },
	{ 0x7cd8d75e, "page_offset_base" },
	{ 0x34b13f23, "snd_card_new" },
	{ 0xe523ad75, "synchronize_irq" },
	{ 0x7a945ae2, "_dev_err" },
	{ 0xb2df4a35, "__xenbus_register_frontend" },
	{ 0x54ea6dfe, "xen_start_flags" },
	{ 0x732852fe, "xenbus_transaction_end" },
	{ 0x4dfa8d4b, "mutex_lock" },
	{ 0x4b750f53, "_raw_spin_unlock_irq" },
	{ 0x2b858ed2, "xenbus_unregister_driver" },
	{ 0x4c9d28b0, "phys_base" },
	{ 0xd03318b2, "snd_pcm_set_ops" },
	{ 0xbdee3a2c, "xenbus_free_evtchn" },
	{ 0xcefb0c9f, "__mutex_init" },
	{ 0x15dfacbf, "snd_pcm_hw_constraint_list" },
	{ 0xd35cce70, "_raw_spin_unlock_irqrestore" },
	{ 0x5fc72f0e, "alloc_pages_exact" },
	{ 0x156696d3, "_dev_warn" },
	{ 0x34eab46d, "bind_evtchn_to_irqhandler" },
	{ 0x5b8239ca, "__x86_return_thunk" },
	{ 0xfb384d37, "kasprintf" },
	{ 0x86623fd7, "notify_remote_via_irq" },
	{ 0xe2d5255a, "strcmp" },
	{ 0x9a36eab5, "snd_card_disconnect" },
	{ 0x97651e6c, "vmemmap_base" },
	{ 0xdd64e639, "strscpy" },
	{ 0x3a7d80f9, "xen_max_p2m_pfn" },
	{ 0x85df9b6c, "strsep" },
	{ 0x3213f038, "mutex_unlock" },
	{ 0xc7c23ff0, "xenbus_exists" },
	{ 0x52431348, "xenbus_transaction_start" },
	{ 0x9b651e51, "xenbus_teardown_ring" },
	{ 0x57719632, "gnttab_grant_foreign_access" },
	{ 0x4b931968, "xen_features" },
	{ 0xfe727411, "get_phys_to_machine" },
	{ 0x773b5623, "snd_pcm_period_elapsed" },
	{ 0xd3ea6452, "xenbus_setup_ring" },
	{ 0xa80d4223, "xenbus_frontend_closed" },
	{ 0x7be4e7dc, "gnttab_end_foreign_access" },
	{ 0xf09b5d9a, "get_zeroed_page" },
	{ 0xeb233a45, "__kmalloc" },
	{ 0x25f02c87, "xen_p2m_addr" },
	{ 0x9060323f, "module_layout" },
};

MODULE_INFO(depends, "snd-pcm,snd");

